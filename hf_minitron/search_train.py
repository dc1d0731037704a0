"""The search's lightweight retraining: LoRA (plus what hidden-size pruning disturbs, trained in full) or every
parameter, by distillation, in segments that resume from the candidate's last checkpoint.

Training in segments lets the search score every candidate at the same step before going on, so it can see when the
ranking has settled (paper Fig. 9) and stop there. A segment is `MinitronDistillTrainer` resumed from the
candidate's checkpoint (weights or adapter, optimizer, schedule, RNG, data position), so N segments train exactly
as one run would. The winner's weights are bound to the fingerprint of the pruned base they were trained from
(peft #1746: an adapter loaded on the wrong base silently does nothing) and applied to it by the prune stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from .archs import get_arch

ADAPTER_BASE_FILE = "adapter_base.json"
# what of a checkpoint the winner keeps: the adapter or the model, never the optimizer
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model*.safetensors",
                "model.safetensors.index.json", "config.json", "generation_config.json")


def fingerprint(model) -> str:
    """sha256 over the model's tensors (names, shapes, bytes): identifies the exact base of an adapter."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trained_in_full(config, base_config, what: str) -> list[str]:
    """Modules LoRA training also updates in full (peft `modules_to_save`): every hidden-size norm, and with
    "norms+embeddings" the embeddings (and an untied LM head) of a shape whose hidden size was pruned."""
    if what == "none":
        return []
    spec = get_arch(config)
    names = [*spec.layer_norms, spec.final_norm]  # peft matches a module whose name ends with one of these
    if what == "norms+embeddings" and config.hidden_size < base_config.hidden_size:
        names.append(spec.embed)
        if not getattr(config, "tie_word_embeddings", False):
            names.append(spec.lm_head)
    return names


def wrap(student, search, base_config, seed: int):
    """The model a candidate trains: `student` itself (mode full) or `student` with seeded LoRA adapters; in fp32
    either way, as distillation trains (bf16/fp16 only as autocast: small updates to norms would round away)."""
    if student.dtype in (torch.bfloat16, torch.float16):
        student.float()
    if search.mode == "full":
        return student
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    extra = trained_in_full(student.config, base_config, search.lora_also_train)
    tied = bool(getattr(student.config, "tie_word_embeddings", False)) and get_arch(student.config).embed in extra
    lora = LoraConfig(r=search.lora_r, lora_alpha=search.lora_alpha, target_modules=search.lora_target,
                      lora_dropout=0.0, task_type="CAUSAL_LM", modules_to_save=extra or None,
                      ensure_weight_tying=tied)
    set_seed(seed)  # the adapters' init: the same in every process, whatever ran before
    return get_peft_model(student, lora)


class _StopAt(TrainerCallback):
    """Ends a segment at step `stop` with a checkpoint (the run's schedule still spans every step)."""

    def __init__(self, stop: int):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.stop:
            control.should_training_stop = control.should_save = True
        return control


def per_process_batch(batch_size: int) -> int:
    """Windows per step in each process: `search.batch_size` is the step's windows over every process of a launch,
    so a search retrains on the same tokens per step, and ranks alike, on any number of processes."""
    from . import ranks

    world = ranks.world()
    if batch_size % world:
        raise ValueError(f"search.batch_size {batch_size} is not a multiple of the {world} processes (the windows "
                         f"of a retraining step are split among them); give a multiple of {world}")
    return batch_size // world


def train_segment(model, teacher, tokenizer, dataset, search, folder: Path, steps: int, stop: int,
                  resume: Path | None, seed: int = 0, progress: bool = True, cache: dict | None = None):
    """Distil `teacher` into `model` from checkpoint `resume` (or the start) up to step `stop` of a `steps`-step run;
    the checkpoint lands in `folder`/checkpoint-`stop`. `cache` keeps the packed dataset between segments."""
    from .distill import DistillConfig, MinitronDistillTrainer
    from .cached_distill import CachedDistillTrainer, TeacherCache

    cache = {} if cache is None else cache
    prepared = cache.get("search_dataset")
    if isinstance(teacher, TeacherCache):  # a teacher-logit cache: its windows, already one per row
        prepared = cache.setdefault("search_dataset", teacher.dataset())
    args = DistillConfig(output_dir=str(folder), max_steps=steps,
                         per_device_train_batch_size=per_process_batch(search.batch_size),
                         max_length=search.seq_len, learning_rate=search.lr, save_strategy="no", report_to=[],
                         logging_steps=max(1, steps // 5), gradient_checkpointing=False, seed=seed,
                         disable_tqdm=not progress, kd_chunk_tokens=1024,
                         dataset_kwargs={"skip_prepare_dataset": True} if prepared is not None else None)
    trainer_class = CachedDistillTrainer if isinstance(teacher, TeacherCache) else MinitronDistillTrainer
    trainer = trainer_class(model, teacher, args, train_dataset=dataset if prepared is None else prepared,
                            processing_class=tokenizer, callbacks=[_StopAt(stop)])
    cache["search_dataset"] = trainer.train_dataset
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model.eval()
    return model


def keep_weights(checkpoint: Path, folder: Path, base_fingerprint: str, base_path: str, shape: dict,
                 mode: str) -> None:
    """A checkpoint's weights (adapter or full model, no optimizer) into `folder`, bound to the pruned base."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for pattern in WEIGHT_FILES:
        for f in checkpoint.glob(pattern):
            shutil.copy(f, tmp / f.name)
    if (tmp / "adapter_config.json").is_file():  # name the base it belongs to (informational; the hash decides)
        config = json.loads((tmp / "adapter_config.json").read_text())
        (tmp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_path},
                                                            indent=2) + "\n")
    (tmp / ADAPTER_BASE_FILE).write_text(json.dumps(
        {"base": base_path, "base_sha256": base_fingerprint, "shape": shape, "mode": mode}, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def merge_adapter(base_model, folder: str | Path):
    """The search winner's weights applied to the pruned base they were trained from (a LoRA adapter merged, or
    the fully retrained weights loaded); any other base is refused."""
    folder = Path(folder)
    bound = json.loads((folder / ADAPTER_BASE_FILE).read_text())
    actual = fingerprint(base_model)
    if bound["base_sha256"] != actual:
        raise ValueError(f"adapter in {str(folder)!r} was trained on another base (sha256 {bound['base_sha256'][:12]}, "
                         f"this one {actual[:12]}); refusing to merge it")
    if bound.get("mode") == "full":
        return type(base_model).from_pretrained(str(folder), dtype=base_model.dtype).to(base_model.device)
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
