"""Layer-by-layer importance (`importance.mode: layers`) against the in-memory pass, on every family."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers import teacher_folder

import hf_minitron.layerwise as layerwise
from hf_minitron.importance import ImportanceConfig, ImportanceScores, compute_importance, run_importance
from hf_minitron.layerwise import WeightReader, compute_importance_layerwise, use_layers
from hf_minitron.models import ModelSource, load_model, resolve_source

IDS = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(1))
# every pass: a partial last batch, perplexity drops of runs up to the whole depth, head ablation
EVERY_PASS = dict(batch_size=2, depth_ppl_samples=3, depth_ppl_runs=[1, 2, 4], head_ablation_samples=3)


def _saved(name: str, folder: Path) -> ModelSource:
    """The tiny model of `name`, saved in several shards (the index is read, as for a large teacher)."""
    tiny_model(name).save_pretrained(folder, max_shard_size="20KB")
    return resolve_source(str(folder))


def _assert_same_scores(layers: ImportanceScores, memory: ImportanceScores) -> None:
    assert layers.tensors.keys() == memory.tensors.keys()
    for key, expected in memory.tensors.items():  # BI differs by the float32 Gram matrix's summation order only
        torch.testing.assert_close(layers.tensors[key], expected, rtol=1e-5, atol=1e-9, msg=key)
    assert layers.meta == memory.meta


def _both(source: ModelSource, config: ImportanceConfig, ids: torch.Tensor = IDS):
    memory = compute_importance(load_model(source), ids, config, progress=False)
    return compute_importance_layerwise(source, ids, config, progress=False), memory


def test_layer_by_layer_scores_equal_the_in_memory_pass(arch_name, tmp_path):
    _assert_same_scores(*_both(_saved(arch_name, tmp_path), ImportanceConfig(**EVERY_PASS)))


def test_activations_spilled_to_disk_give_the_same_scores(arch_name, tmp_path, monkeypatch, capsys):
    spill = tmp_path / "spill"
    monkeypatch.setattr(layerwise.tempfile, "mkdtemp", lambda prefix: (spill.mkdir(), str(spill))[1])
    written = []
    real_save = layerwise.save_file
    monkeypatch.setattr(layerwise, "save_file", lambda tensors, path: (written.append(path), real_save(tensors, path)))
    _assert_same_scores(*_both(_saved(arch_name, tmp_path / "model"),
                               ImportanceConfig(**EVERY_PASS, activation_memory=1)))
    assert len(written) == 3 * 5  # 3 batches, after the embeddings and after each of the 4 layers
    assert not spill.exists()  # removed at the end
    assert "activation_memory=1 bytes go to" in capsys.readouterr().err


def test_pre_activation_site_and_a_longer_block_importance_run(tmp_path):
    config = ImportanceConfig(batch_size=3, depth_ppl_samples=0, neuron_site="pre", bi_max_run=4)
    _assert_same_scores(*_both(_saved("phi3", tmp_path), config))


def test_the_dtype_asked_for_is_the_one_the_in_memory_path_loads(tmp_path):
    source, ids = _saved("gemma3_text", tmp_path), IDS
    config = ImportanceConfig(batch_size=2, depth_ppl_samples=2, head_ablation_samples=1)
    memory = compute_importance(load_model(source, dtype="bfloat16"), ids, config, progress=False)
    _assert_same_scores(compute_importance_layerwise(source, ids, config, progress=False, dtype="bfloat16"), memory)


def test_each_read_holds_one_layer_and_every_layer_is_read_once(tmp_path, monkeypatch):
    reads = []
    real_read = WeightReader.read
    monkeypatch.setattr(WeightReader, "read", lambda self, names, *a: (reads.append(list(names.values())),
                                                                       real_read(self, names, *a))[1])
    compute_importance_layerwise(_saved("llama", tmp_path), IDS, ImportanceConfig(**EVERY_PASS), progress=False)
    groups = [{".".join(n.split(".")[:3]) if n.startswith("model.layers.") else n for n in names} for names in reads]
    assert groups == [{"model.embed_tokens.weight"}, *({f"model.layers.{i}"} for i in range(4)),
                      {"model.norm.weight"}, {"lm_head.weight"}]


def test_tied_head_reads_the_embedding_matrix(tmp_path):
    source = _saved("llama_tied", tmp_path)
    assert "lm_head.weight" not in WeightReader(source.folder).files
    _assert_same_scores(*_both(source, ImportanceConfig(batch_size=5, depth_ppl_samples=2)))


def test_run_importance_scores_a_folder_layer_by_layer(tmp_path, smollm2_tokenizer):
    """The stage entry: given the folder's ModelSource and mode layers, the scores folder is the in-memory one."""
    source = resolve_source(str(teacher_folder(tmp_path / "teacher", smollm2_tokenizer)))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i} of the calibration text." for i in range(400)))
    config = ImportanceConfig(samples=4, seq_len=32, batch_size=2, depth_ppl_samples=2)
    memory = run_importance(load_model(source), smollm2_tokenizer, str(text), config, tmp_path / "memory")
    config.mode = "layers"
    layers = run_importance(source, smollm2_tokenizer, str(text), config, tmp_path / "layers")
    assert layers.tokens == memory.tokens and layers.record == memory.record
    scores, expected = ImportanceScores.load(layers.path), ImportanceScores.load(memory.path)
    assert scores.meta["config"]["mode"] == "layers"
    scores.meta["config"]["mode"] = "auto"
    _assert_same_scores(scores, expected)


def test_a_loaded_model_is_scored_in_memory_with_a_note(capsys):
    assert not use_layers("layers", tiny_model("llama"))
    assert capsys.readouterr().err.strip() == ("hf-minitron: importance mode 'layers' reads a model folder one layer "
                                               "at a time; given a loaded model: scoring it in memory")
    assert not use_layers("auto", tiny_model("llama"))
    assert capsys.readouterr().err == ""


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'disk' is not one of auto, memory, layers"):
        use_layers("disk", ModelSource("x", "/x"))


def test_gguf_teacher_falls_back_to_memory_with_a_note(capsys):
    gguf = ModelSource("m.gguf", "/models", gguf_file="m.gguf")
    assert not use_layers("layers", gguf)
    assert capsys.readouterr().err.strip() == ("hf-minitron: importance mode 'layers' needs safetensors; m.gguf is "
                                               "GGUF: scoring it in memory")
    assert not use_layers("auto", gguf)
    assert capsys.readouterr().err == ""


def test_auto_goes_layer_by_layer_when_the_weights_exceed_half_the_free_memory(tmp_path, monkeypatch):
    source = _saved("llama", tmp_path)
    size = layerwise.weights_bytes(source)
    monkeypatch.setattr(layerwise, "free_memory", lambda: 2 * size - 2)
    assert use_layers("auto", source)
    monkeypatch.setattr(layerwise, "free_memory", lambda: 2 * size)
    assert not use_layers("auto", source)
    assert not use_layers("memory", source)


DIST_SCRIPT = """
import sys, torch
from hf_minitron.importance import ImportanceConfig
from hf_minitron.layerwise import compute_importance_layerwise
from hf_minitron.models import resolve_source
from accelerate import PartialState
ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(1))
config = ImportanceConfig(batch_size=1, depth_ppl_samples=3, head_ablation_samples=2)
scores = compute_importance_layerwise(resolve_source(sys.argv[1]), ids, config, progress=False)
if PartialState().is_main_process:
    scores.save(sys.argv[2])
PartialState().destroy_process_group()  # before exit: a group left to the interpreter's teardown can abort a rank
"""


def test_two_processes_give_single_process_scores(tmp_path):
    source = _saved("qwen2", tmp_path / "model")
    script = tmp_path / "score.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), source.folder,
           str(tmp_path / "two")]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), source.folder, str(tmp_path / "one")], check=True, env=env,
                   timeout=300)
    one, two = ImportanceScores.load(tmp_path / "one"), ImportanceScores.load(tmp_path / "two")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    for key in one.tensors:
        torch.testing.assert_close(two.tensors[key], one.tensors[key], rtol=1e-6, atol=1e-9)
