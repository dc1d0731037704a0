"""Streaming prune (`prune.mode: stream`): the folder written one tensor group at a time is `run_prune`'s in-memory
output, tensor for tensor, on every family."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config

from hf_minitron.importance import ImportanceConfig, compute_importance
from hf_minitron.layerwise import WeightReader
from hf_minitron.models import ModelSource, load_model, resolve_source
from hf_minitron.prune import PruneConfig, PruneTarget, build_student, plan_pruning, run_prune
from hf_minitron.prune_stream import use_stream, write_student

IDS = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(2))


def _teacher(model, folder: Path):
    """The model saved in several shards, its ModelSource and its scores."""
    model.save_pretrained(folder, max_shard_size="20KB")
    scores = compute_importance(model, IDS, ImportanceConfig(batch_size=5, depth_ppl_samples=0), progress=False)
    return resolve_source(str(folder)), scores


def _every_axis(config) -> PruneTarget:
    gqa = config.num_key_value_heads < config.num_attention_heads
    return PruneTarget(hidden_size=48, ffn_size=64, num_heads=2, num_kv_heads=1 if gqa else None, num_layers=3)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(path))
    return out


def _assert_same_folder(streamed: Path, memory: Path) -> None:
    a, b = _tensors(streamed), _tensors(memory)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in memory.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert (streamed / name).read_text() == (memory / name).read_text(), name
    info_a, info_b = (json.loads((f / "pruning.json").read_text()) for f in (streamed, memory))
    assert info_a["options"].pop("mode") == "stream" and info_b["options"].pop("mode") == "memory"
    assert info_a == info_b


def _prune_both(model, tmp_path: Path, target=None, options: dict | None = None, dtype: str | None = None) -> None:
    source, scores = _teacher(model, tmp_path / "teacher")
    target = target or _every_axis(model.config)
    out = {}
    for mode in ("stream", "memory"):
        teacher = source if mode == "stream" else load_model(source, dtype=dtype)
        config = PruneConfig(depth_metric="bi", mode=mode, **(options or {}))
        out[mode] = run_prune(teacher, None, scores, target, config, tmp_path / mode, {"teacher": "t"},
                              dtype=dtype).path
    _assert_same_folder(out["stream"], out["memory"])


def test_streamed_student_is_the_in_memory_one(arch_name, tmp_path):
    _prune_both(tiny_model(arch_name), tmp_path)


def test_untied_scaled_embedding_is_rescaled_as_in_memory(tmp_path):
    """Gemma with untied embeddings: the embedding matrix is multiplied by sqrt(teacher / student hidden)."""
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    _prune_both(AutoModelForCausalLM.from_config(config).eval(), tmp_path, PruneTarget(hidden_size=32))


def test_the_dtype_asked_for_is_the_saved_one(tmp_path):
    _prune_both(tiny_model("qwen3"), tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merged_heads_stream_as_in_memory(tmp_path):
    _prune_both(tiny_model("nemotron"), tmp_path, PruneTarget(num_heads=2), {"merge_heads": True})


def test_shards_and_index_are_save_pretrained_s_and_the_folder_loads(tmp_path):
    teacher = tiny_model("llama")
    source, scores = _teacher(teacher, tmp_path / "teacher")
    plan = plan_pruning(teacher.config, scores, PruneTarget(ffn_size=64, hidden_size=48))
    write_student(source, plan, tmp_path / "stream", max_shard_size="20KB")
    student = build_student(load_model(source), plan)
    student.save_pretrained(tmp_path / "memory", max_shard_size="20KB")
    index = "model.safetensors.index.json"
    assert (tmp_path / "stream" / index).read_text() == (tmp_path / "memory" / index).read_text()
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, student(input_ids=IDS).logits, rtol=0, atol=0)


def test_each_read_holds_one_group_of_the_teacher(tmp_path, monkeypatch):
    reads = []
    real_read = WeightReader.read
    monkeypatch.setattr(WeightReader, "read", lambda self, names, *a: (reads.append(list(names.values())),
                                                                       real_read(self, names, *a))[1])
    teacher = tiny_model("llama")
    source, scores = _teacher(teacher, tmp_path / "teacher")
    plan = plan_pruning(teacher.config, scores, PruneTarget(drop_layers=[1]))
    write_student(source, plan, tmp_path / "stream")
    groups = [{".".join(n.split(".")[:3]) if n.startswith("model.layers.") else n for n in names} for names in reads]
    assert groups == [{"model.embed_tokens.weight"}, {"model.layers.0"}, {"model.layers.2"}, {"model.layers.3"},
                      {"model.norm.weight"}, {"lm_head.weight"}]


def test_stream_refuses_a_search_adapter():
    with pytest.raises(ValueError, match="cannot merge the search adapter 'runs/a'.*set prune.mode to auto or memory"):
        use_stream("stream", ModelSource("t", "/t"), "runs/a")
    assert not use_stream("auto", ModelSource("t", "/t"), "runs/a")  # auto merges it in memory


def test_auto_streams_a_safetensors_folder_and_keeps_a_loaded_model_in_memory(capsys):
    assert use_stream("auto", ModelSource("t", "/t"))
    assert not use_stream("memory", ModelSource("t", "/t"))
    assert not use_stream("auto", tiny_model("llama"))
    assert capsys.readouterr().err == ""
    assert not use_stream("stream", tiny_model("llama"))
    assert "given a loaded model: pruning it in memory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'disk' is not one of auto, memory, stream"):
        use_stream("disk", ModelSource("t", "/t"))


def test_gguf_teacher_is_pruned_in_memory_with_a_note(capsys):
    assert not use_stream("stream", ModelSource("m.gguf", "/models", gguf_file="m.gguf"))
    assert capsys.readouterr().err.strip() == ("hf-minitron: prune mode 'stream' needs safetensors; m.gguf is GGUF: "
                                               "pruning it in memory")
