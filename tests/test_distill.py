"""Distillation: losses, gradients, chunking, saving without projections, resume after a kill, DDP."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
          "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([(DATA / "tinyshakespeare.txt").read_text()[:100_000]], trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A 512-token byte-level BPE trained on Shakespeare in a second: no download, small embeddings."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab: int, hidden: int = 64, layers: int = 2, inter: int = 128, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=512, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def text_dataset(n_docs: int = 40):
    from datasets import Dataset

    text = (DATA / "tinyshakespeare.txt").read_text()[:n_docs * 400]
    return Dataset.from_dict({"text": [text[i:i + 400] for i in range(0, len(text), 400)]})


def make_trainer(teacher, student, tmp_path, **cfg):
    from hf_minitron.distill import DistillConfig, MinitronDistillTrainer

    # fp32 unless a test asks: these tests check the losses' algebra, which bf16 autocast would blur
    cfg = {"max_length": 32, "per_device_train_batch_size": 2, "gradient_checkpointing": False, "report_to": [],
           "kd_chunk_tokens": 16, "max_steps": 1, "save_strategy": "no", "logging_steps": 1, "bf16": False, **cfg}
    config = DistillConfig(output_dir=str(tmp_path / "out"), **cfg)
    return MinitronDistillTrainer(student, teacher, config, train_dataset=text_dataset(),
                                  processing_class=tiny_tokenizer())


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


# ---- losses -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "mse", "cosine"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_divergence_zero_on_equal_and_positive_otherwise(kind, top_k):
    from hf_minitron.losses import logit_divergence

    torch.manual_seed(0)
    zt = torch.randn(6, 50)
    zs = (zt + torch.randn(6, 50)).requires_grad_()
    assert logit_divergence(zt, zt, kind, 2.0, top_k).abs().max() < 1e-5
    loss = logit_divergence(zs, zt, kind, 2.0, top_k)
    assert (loss > 0).all()
    loss.sum().backward()
    assert zs.grad.abs().sum() > 0


def test_jsd_endpoints_are_the_kls():
    from hf_minitron.losses import logit_divergence

    zs, zt = torch.randn(4, 20), torch.randn(4, 20)
    assert torch.allclose(logit_divergence(zs, zt, "jsd", beta=0.0), logit_divergence(zs, zt, "forward_kl"))
    assert torch.allclose(logit_divergence(zs, zt, "jsd", beta=1.0), logit_divergence(zs, zt, "reverse_kl"))


@pytest.mark.parametrize("kind,top_k", [("forward_kl", None), ("jsd", 7), ("cosine", None)])
def test_chunked_matches_unchunked(kind, top_k):
    from hf_minitron.losses import chunked_logit_losses

    torch.manual_seed(0)
    s_head, t_head = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(24, 44, bias=False)  # padded teacher vocab
    h_t, labels = torch.randn(37, 24), torch.randint(0, 40, (37,))
    results = []
    for chunk in (None, 8):
        s_head.zero_grad()
        h_s = torch.randn(37, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        kd, ce = chunked_logit_losses(h_s, h_t, labels, s_head, t_head, kind, 1.5, top_k, chunk_tokens=chunk)
        (kd + 0.3 * ce).backward()
        results.append((kd.detach(), ce.detach(), h_s.grad.clone(), s_head.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_loss_names_are_refused(tmp_path):
    from hf_minitron.distill import DistillConfig

    with pytest.raises(ValueError, match="'kl2'"):
        DistillConfig(output_dir=str(tmp_path), logit_loss="kl2")
    with pytest.raises(ValueError, match="'l1'"):
        DistillConfig(output_dir=str(tmp_path), is_loss="l1")
    with pytest.raises(ValueError, match="'3-1'"):
        DistillConfig(output_dir=str(tmp_path), is_layers="3-1")


# ---- trainer ------------------------------------------------------------------------------------------------
def test_kl_zero_when_student_equals_teacher(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok) + 16)  # padded vocabulary: only the shared logits are compared
    student = copy.deepcopy(teacher)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="0:0,2:2")
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["train"]["kd_logit"][-1] < 1e-6
    assert trainer._metrics["train"]["kd_is"][-1] < 1e-6  # same width: projections start as identity


def test_gradients_reach_every_student_parameter_and_projections(tmp_path):
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=3, seed=0)
    student = tiny_llama(len(tok), hidden=32, layers=2, inter=64, seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="0:0,3:2", w_clm=0.5, alpha=0.7)
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    params = dict(trainer.model.named_parameters())
    assert any("minitron_is_projections" in n for n in params)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    opt_params = {id(p) for g in trainer.create_optimizer().param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in params.values())


def test_loss_normalised_over_accumulation_window(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    trainer = make_trainer(teacher, student, tmp_path)
    batch = first_batch(trainer)
    n = (batch["labels"][:, 1:] != -100).sum()
    per_token = trainer.compute_loss(trainer.model, batch)
    window = trainer.compute_loss(trainer.model, batch, num_items_in_batch=4 * n)
    assert torch.allclose(window * 4, per_token, rtol=1e-5)


def test_bf16_runs_the_teacher_and_the_logit_loss_under_autocast(tmp_path):
    """accelerate autocasts only the student's forward: the teacher's and the LM heads' matmuls must follow."""
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, torch.is_autocast_enabled("cpu"))
        return hook

    for name, module in (("teacher", teacher.model), ("head", student.lm_head)):
        module.register_forward_hook(record(name))
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", bf16=True, use_cpu=True)
    trainer.compute_loss(trainer.model, first_batch(trainer))
    assert seen == {"teacher": True, "head": True}


def teacher_inputs(teacher) -> list:
    """The input_ids of every forward of `teacher`'s body, as they come."""
    seen = []
    teacher.model.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"]),
                                        with_kwargs=True)
    return seen


def test_an_on_policy_step_scores_the_students_own_continuation(tmp_path):
    """on_policy=1: the teacher sees the window's prompt followed by the student's samples, not the corpus."""
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    seen = teacher_inputs(teacher)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", on_policy=1.0, on_policy_prompt=8)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert torch.equal(seen[0][:, :8], batch["input_ids"][:, :8]) and seen[0].shape == batch["input_ids"].shape
    assert not torch.equal(seen[0][:, 8:], batch["input_ids"][:, 8:])
    assert trainer._metrics["train"]["on_policy"] == [1.0]


def test_an_off_policy_step_of_an_on_policy_run_scores_the_corpus(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    seen = teacher_inputs(teacher)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", on_policy=1e-9, on_policy_prompt=8)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert torch.equal(seen[0], batch["input_ids"]) and trainer._metrics["train"]["on_policy"] == [0.0]


def test_on_policy_loss_is_normalised_over_the_sampled_tokens(tmp_path):
    """Given the window's token count, an on-policy step divides by the sampled tokens it scores instead."""
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", on_policy=1.0, on_policy_prompt=8)
    batch = first_batch(trainer)
    trainer.model.train()
    n = (batch["labels"][:, 1:] != -100).sum()
    torch.manual_seed(0)
    per_token = trainer.compute_loss(trainer.model, batch)  # no count given: its own sampled tokens
    torch.manual_seed(0)
    given = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
    assert torch.allclose(given, per_token, rtol=1e-5)


def test_an_unlikelihood_step_adds_the_loss_of_the_students_greedy_repeats(tmp_path):
    """unlikelihood=1: the step's loss is the KD loss plus the weighted unlikelihood of its greedy continuation."""
    from hf_minitron.unlikelihood import unlikelihood_loss

    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", unlikelihood=1.0, unlikelihood_weight=3.0,
                           unlikelihood_tokens=24, on_policy_prompt=8)
    batch = first_batch(trainer)
    trainer.model.train()
    total = trainer.compute_loss(trainer.model, batch)
    ul, share = unlikelihood_loss(trainer.model, trainer.model, batch["input_ids"][:, :8], 24, tok.pad_token_id)
    trainer.args.unlikelihood = 0.0
    kd = trainer.compute_loss(trainer.model, batch)
    assert torch.allclose(total, kd + 3.0 * ul, rtol=1e-5)
    assert trainer._metrics["train"]["repeat_share"] == [share]


def test_a_step_not_drawn_for_unlikelihood_adds_nothing(tmp_path):
    tok = tiny_tokenizer()
    teacher, student = tiny_llama(len(tok), seed=0), tiny_llama(len(tok), seed=1)
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", unlikelihood=1e-9, on_policy_prompt=8)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert "unlikelihood" not in trainer._metrics["train"]


@pytest.mark.parametrize("settings, message", [
    ({"on_policy": 1.5}, "on_policy must be a fraction in [0, 1], got 1.5"),
    ({"on_policy": 0.5, "teacher_cache": "auto"}, "needs the live teacher"),
    ({"on_policy": 0.5, "on_policy_prompt": 32}, "on_policy_prompt must be in 1..max_length-1 (31), got 32"),
    ({"unlikelihood": -0.1}, "unlikelihood must be a fraction in [0, 1], got -0.1"),
    ({"unlikelihood": 0.5, "teacher_cache": "auto"}, "turn teacher_cache ('auto') off"),
    ({"unlikelihood": 0.5, "unlikelihood_tokens": 3}, "unlikelihood_tokens must be >= 4 (one n-gram), got 3"),
    ({"unlikelihood": 0.5, "on_policy_prompt": 0}, "on_policy_prompt must be in 1..max_length-1 (31), got 0"),
])
def test_on_policy_settings_refused_in_one_line(tmp_path, settings, message):
    from hf_minitron.distill import DistillConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        DistillConfig(output_dir=str(tmp_path), max_length=32, bf16=False, **settings)


def test_gemma2_kd_loss_compares_the_soft_capped_logits(tmp_path):
    """Gemma 2 soft-caps its logits after the LM head: the chunked KD loss must see the logits the models output."""
    from conftest import tiny_model

    from hf_minitron.losses import logit_divergence

    teacher, student = tiny_model("gemma2", seed=0), tiny_model("gemma2", seed=1)
    for m in (teacher, student):
        m.config.final_logit_softcapping = 2.0  # small, so that capping changes the distributions a lot
        with torch.no_grad():
            m.model.norm.weight.fill_(49.0)  # Gemma norms scale by (1 + w): logits ~50x those of a random init
    trainer = make_trainer(teacher, student, tmp_path, is_layers="off", kd_chunk_tokens=7)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    student.train()  # no dropout in these configs; the trainer logs under "train"
    with torch.no_grad():
        trainer.compute_loss(student, {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
        zs, zt = student(ids).logits[:, :-1].flatten(0, 1), teacher(ids).logits[:, :-1].flatten(0, 1)
    want = logit_divergence(zs, zt).mean().item()
    assert trainer._metrics["train"]["kd_logit"][-1] == pytest.approx(want, rel=1e-4)
    uncapped = logit_divergence(student.lm_head(student(ids, output_hidden_states=True).hidden_states[-1]),
                                teacher.lm_head(teacher(ids, output_hidden_states=True).hidden_states[-1]))
    assert abs(uncapped.mean().item() / want - 1) > 0.5  # the test can tell the two apart


def test_bf16_student_trains_with_fp32_weights_and_saves_bf16(tmp_path, monkeypatch):
    from safetensors import safe_open

    from hf_minitron.distill import MinitronDistillTrainer, distill

    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), layers=2, seed=0).to(torch.bfloat16)
    student = tiny_llama(len(tok), hidden=32, inter=64, seed=1).to(torch.bfloat16)
    seen = []
    compute_loss = MinitronDistillTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({p.dtype for p in model.parameters()})
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(MinitronDistillTrainer, "compute_loss", spy)
    out = tmp_path / "run"
    result = distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=2 * 2 * 32, tokenizer=tok,
                     max_length=32, per_device_train_batch_size=2, report_to=[], bf16=False)
    assert seen and all(s == {torch.float32} for s in seen)  # fp32 master weights (and so fp32 AdamW moments)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert result["dtypes"] == {"trained": "float32", "saved": "bfloat16"}


def test_global_batch_tokens_sets_accumulation_and_min_lr_ends_the_cosine(tmp_path):
    tok = tiny_tokenizer()
    trainer = make_trainer(tiny_llama(len(tok)), tiny_llama(len(tok), seed=1), tmp_path, global_batch_tokens=256,
                           learning_rate=1e-3, min_lr=1e-4, warmup_steps=0)
    assert trainer.args.gradient_accumulation_steps == 4  # 256 tokens / (2 windows x 32 tokens x 1 process)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(10):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)


@pytest.mark.parametrize("settings,message", [
    ({"global_batch_tokens": 100}, "global_batch_tokens 100 is not a multiple of one step: "
                                   "per_device_train_batch_size 2 x max_length 32 x 1 processes = 64 tokens"),
    ({"global_batch_tokens": 32}, "global_batch_tokens 32 is smaller than one step"),
    ({"global_batch_tokens": 128, "gradient_accumulation_steps": 4}, "not both"),
    ({"min_lr": 1e-3, "learning_rate": 1e-4}, "min_lr 0.001 is above learning_rate 0.0001"),
    ({"min_lr": None}, "cosine_with_min_lr needs min_lr"),
])
def test_schedule_settings_refused_in_one_line(tmp_path, settings, message):
    from hf_minitron.distill import DistillConfig

    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        DistillConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=32, **settings)


def test_distill_flags_take_counts_and_the_new_settings():
    from hf_minitron.cli import build_parser
    from hf_minitron.distill import DistillConfig
    from hf_minitron.schema import given

    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o",
                                      "--global-batch-tokens", "512K", "--min-lr", "2e-5", "--train-dtype", "auto",
                                      "--is-sites", "block,mlp_input", "--is-projection", "per_pair"])
    values = given(args, "distill", DistillConfig)
    assert values == {"global_batch_tokens": 512_000, "min_lr": 2e-5, "train_dtype": "auto",
                      "is_sites": ["block", "mlp_input"], "is_projection": "per_pair"}
    config = DistillConfig(output_dir="o", max_length=1000, **values)
    assert config.lr_scheduler_type.value == "cosine_with_min_lr" and config.is_loss == "cosine"


def test_different_tokenizers_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hf_minitron.models import check_same_tokenizer

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(tiny_tokenizer(), other)
    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer())


def save_pair(tmp_path: Path) -> tuple[str, str]:
    tok = tiny_tokenizer()
    paths = []
    for name, model in [("teacher", tiny_llama(len(tok) + 8, layers=3, seed=0)),
                        ("student", tiny_llama(len(tok), hidden=32, inter=64, seed=1))]:
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


def write_corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text((DATA / "tinyshakespeare.txt").read_text()[:20_000])
    return str(path)


def test_distill_end_to_end_saves_student_without_projections(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hf_minitron.distill import distill

    teacher, student = save_pair(tmp_path)
    out = str(tmp_path / "run")
    kw = dict(max_length=32, per_device_train_batch_size=2, gradient_checkpointing=False, report_to=[],
              kd_chunk_tokens=16, is_layers="0:0,3:2", w_clm=0.1, logit_loss="reverse_kl", top_k=20,
              save_steps=2, logging_steps=1, keep_checkpoints=True)
    result = distill(teacher, student, write_corpus(tmp_path), out, max_tokens=4 * 2 * 32, **kw)
    assert result["steps"] == 4 and result["tokens"] == 256
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "projection" in k]
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "is_projections.safetensors"))
    assert not os.path.exists(os.path.join(out, "is_projections.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.hidden_size == 32 and not hasattr(reloaded, "minitron_is_projections")
    with pytest.raises(FileExistsError):
        distill(teacher, student, write_corpus(tmp_path), out, max_tokens=256, **kw)
    assert distill(teacher, student, write_corpus(tmp_path), out, max_tokens=256, resume=True, **kw)["steps"] == 4


def test_distill_resumes_past_an_interrupted_checkpoint_save(tmp_path):
    """A kill during `checkpoint-3`'s save left its config only: resume takes checkpoint-2 and finishes."""
    from hf_minitron.distill import RESULT_FILE, distill

    teacher, student = save_pair(tmp_path)
    out = tmp_path / "run"
    kw = dict(max_length=32, per_device_train_batch_size=2, save_steps=1, report_to=[], keep_checkpoints=True)
    distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=2 * 2 * 32, **kw)
    for name in (RESULT_FILE, "model.safetensors", "config.json"):  # as if the run had stopped after step 2
        (out / name).unlink()
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "config.json").write_text("{}")
    result = distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=3 * 2 * 32, resume=True, **kw)
    assert result["steps"] == 3
    assert (out / "incomplete-checkpoint-3").is_dir()


def test_distill_keeps_the_newest_two_checkpoints_while_training(tmp_path):
    from hf_minitron.distill import distill

    teacher, student = save_pair(tmp_path)
    out = tmp_path / "run"
    distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=4 * 2 * 32, max_length=32,
            per_device_train_batch_size=2, save_steps=1, report_to=[], keep_checkpoints=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_distill_drops_checkpoints_once_the_student_is_saved(tmp_path):
    from hf_minitron.distill import distill

    teacher, student = save_pair(tmp_path)
    out = tmp_path / "run"
    distill(teacher, student, write_corpus(tmp_path), str(out), max_tokens=2 * 2 * 32, max_length=32,
            per_device_train_batch_size=2, save_steps=1, report_to=[])
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("checkpoint-*"))


SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from transformers import TrainerCallback
    from hf_minitron import distill as d

    args = json.loads(sys.argv[1])
    die_at = args.pop("die_at", None)

    class Kill(TrainerCallback):
        def on_save(self, a, state, control, **kw):
            if state.global_step == die_at:
                os.kill(os.getpid(), signal.SIGKILL)

    class Report(TrainerCallback):  # how the student is distributed, once it is wrapped
        trainer = None
        def on_step_end(self, a, state, control, **kw):
            t = self.trainer
            if state.global_step == 1 and t.accelerator.is_main_process:
                print("DIST", t.accelerator.distributed_type.value, type(t.model_wrapped).__name__, flush=True)

    orig = d.MinitronDistillTrainer.__init__
    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.add_callback(Kill())
        report = Report()
        report.trainer = self
        self.add_callback(report)
    d.MinitronDistillTrainer.__init__ = init
    r = d.distill(**args)
    print("LOSSES", json.dumps([h["loss"] for h in r["log_history"] if "loss" in h]))
    from accelerate import PartialState
    PartialState().destroy_process_group()  # before exit: a group left to the interpreter's teardown can abort a rank
""")


def run_script(tmp_path: Path, args: dict, launcher: list[str] | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "run_distill.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(script), json.dumps(args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _losses(proc) -> list[float]:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES")][-1]
    return json.loads(line.split(" ", 1)[1])


def test_resume_after_kill_reproduces_loss_curve(tmp_path):
    teacher, student = save_pair(tmp_path)
    base = dict(teacher=teacher, student=student, data=write_corpus(tmp_path), max_tokens=6 * 2 * 32,
                max_length=32, per_device_train_batch_size=2, gradient_checkpointing=False, report_to=[],
                kd_chunk_tokens=16, is_layers="0:0,3:2", save_steps=3, logging_steps=1, learning_rate=1e-3)
    full = run_script(tmp_path, {**base, "out": str(tmp_path / "full")})
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_script(tmp_path, {**base, "out": str(tmp_path / "cut"), "die_at": 3})
    assert killed.returncode == -9 and (tmp_path / "cut" / "checkpoint-3").is_dir()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = run_script(tmp_path, {**base, "out": str(tmp_path / "cut"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(full), _losses(resumed)
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-4)


def test_ddp_two_cpu_processes(tmp_path):
    teacher, student = save_pair(tmp_path)
    args = dict(teacher=teacher, student=student, data=write_corpus(tmp_path), out=str(tmp_path / "ddp"),
                max_tokens=4 * 2 * 2 * 32, max_length=32, per_device_train_batch_size=2,
                gradient_checkpointing=False, report_to=[], kd_chunk_tokens=16, is_layers="0:0,3:2", save_steps=2,
                logging_steps=1)
    # `--cpu` would start a single process; the DDP recipe with ACCELERATE_USE_CPU=1 gives 2 gloo processes
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "ddp.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe), "--num_processes",
                "2", "--mixed_precision", "no", "--main_process_port", "29517"]
    proc = run_script(tmp_path, args, launcher, {"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "ddp" / "distill_result.json").read_text())
    assert result["steps"] == 4 and result["tokens"] == 512
    assert all(torch.isfinite(torch.tensor(_losses(proc))))
    dist = [ln for ln in proc.stdout.splitlines() if ln.startswith("DIST")][0]
    assert dist.split()[1:] == ["MULTI_CPU", "DistributedDataParallel"], dist  # really two ranks, really DDP
