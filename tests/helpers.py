"""Shared test helpers: member folders as a build leaves them, without training anything.

The metadata dicts follow the files the stages write (`prune.plan_summary` + the build's teacher entry for
pruning.json, `distill.distill`'s result for distill_result.json, `sft.sft`'s for sft_result.json); member.json is
written by the real `MemberRecord.write`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_minitron.rundir import CONFIG_FILE, DISTILL_FILE, EVAL_FILE, PRUNING_FILE, SFT_FILE, TEACHER, MemberRecord

TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def tiny_config(**overrides) -> dict:
    """A tiny Llama config as config.json holds it (hidden 64, MLP 96, 4 heads, 2 KV heads, 4 layers)."""
    from transformers import LlamaConfig

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaConfig(**{**shape, **overrides}).to_dict()


def pruning_record(teacher: str = TEACHER_HUB_ID, ffn_size: int = 48, **target) -> dict:
    """pruning.json: the teacher, the target, the options, the kept layers and both parameter counts."""
    full = {"hidden_size": None, "ffn_size": ffn_size, "num_heads": None, "num_kv_heads": None, "num_layers": None,
            "drop_layers": None, **target}
    return {"teacher": {"source": teacher}, "target": full,
            "options": {"batch_agg": None, "seq_agg": None, "depth_metric": "ppl", "merge_heads": True},
            "kept_layers": [0, 1, 2, 3], "teacher_parameters": 70_000, "student_parameters": 52_000}


def distill_record(teacher: str = TEACHER_HUB_ID, tokens: int = 2_000_000) -> dict:
    """distill_result.json: steps, tokens, loss and the loss settings of a distillation run."""
    return {"steps": 100, "tokens": tokens, "train_loss": 1.23, "max_tokens": tokens, "teacher": teacher,
            "losses": {"logit_loss": "forward_kl", "temperature": 1.0, "top_k": None, "w_logit": 1.0}}


def sft_record(model: str = "base") -> dict:
    """sft_result.json: steps, examples and what the loss was computed on."""
    return {"model": model, "steps": 20, "train_loss": 2.1, "tokens": 10_000, "lora": {"r": 16, "alpha": 32},
            "loss_on": "assistant turns", "examples": 64}


def eval_record(name: str, parameters: int = 52_000, ppl: float = 74.2) -> dict:
    """eval_results.json with one perplexity measurement."""
    return {"model": name, "parameters": parameters, "tasks": {},
            "perplexity": [{"data": "/x/wikitext2_test.txt", "seq_len": 512, "perplexity": ppl}]}


def write_weights(folder: Path) -> None:
    """A one-tensor model.safetensors: enough for the member finder, which only looks for weights."""
    import torch
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))


def write_member_folder(folder: str | Path, record: MemberRecord | None = None, *, config: dict | None = None,
                        files: dict[str, dict] | None = None, weights: bool = True) -> Path:
    """A member folder: config.json, weights, member.json (when `record` is given) and `files` ({name: JSON})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config or tiny_config(intermediate_size=48)))
    if weights:
        write_weights(folder)
    if record is not None:
        record.write(folder)
    for name, data in (files or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


def write_base_member(folder: str | Path, pruned_from: str = TEACHER, distilled_from: str = TEACHER) -> Path:
    """A pruned and distilled base member, as the build writes it."""
    name = Path(folder).name
    return write_member_folder(folder, MemberRecord(name, "base", teacher=TEACHER_HUB_ID, pruned_from=pruned_from,
                                                    distilled_from=distilled_from),
                               files={PRUNING_FILE: pruning_record(), DISTILL_FILE: distill_record(),
                                      EVAL_FILE: eval_record(name)})


def write_instruct_member(folder: str | Path, base: str, files: dict[str, dict] | None = None) -> Path:
    """The SFT variant of the member `base` (a sibling folder), with only its own SFT result unless `files`."""
    name = Path(folder).name
    return write_member_folder(folder, MemberRecord(name, "instruct", teacher=TEACHER_HUB_ID, sft_from=base),
                               files={SFT_FILE: sft_record(base), **(files or {})})


def teacher_folder(folder: str | Path, tokenizer, seed: int = 0, **shape) -> Path:
    """A tiny random Llama teacher saved with `tokenizer` (hidden 64, MLP 128, 4 heads over 2 KV heads, 4 layers,
    tied embeddings unless `shape` says otherwise): a model folder every command loads."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    torch.manual_seed(seed)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **{**dims, **shape})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teacher_and_corpus(root: Path, tokenizer) -> Path:
    """`root` with a tiny random teacher (`teacher_folder`) and `corpus.jsonl`: the first 20 topics of CPython's
    language reference, 2,000 characters each, the build tests' text."""
    from pydoc_data.topics import topics

    teacher_folder(root / "teacher", tokenizer)
    with open(root / "corpus.jsonl", "w") as f:
        for key in sorted(topics)[:20]:
            f.write(json.dumps({"text": topics[key][:2000]}) + "\n")
    return root
