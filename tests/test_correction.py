"""Teacher correction: the teacher's loss on the corpus drops, the output is a whole from_pretrained folder in the
teacher's dtype, a finished run is not redone, an interrupted one resumes, the recipe section takes counts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from test_distill import DATA, tiny_tokenizer

STEP_TOKENS = 2 * 32  # per_device_train_batch_size x max_length
SETTINGS = dict(max_length=32, per_device_train_batch_size=2, learning_rate=1e-2, min_lr=1e-3, warmup_steps=0,
                report_to=[], logging_steps=1, save_steps=2, bf16=False)


def bf16_teacher(tok):
    """A tiny tied-embedding Llama from conftest, grown to the tokenizer's vocabulary, in bf16."""
    model = tiny_model("llama_tied")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model.to(torch.bfloat16)


def corpus(n_docs: int = 30):
    from datasets import Dataset

    text = (DATA / "tinyshakespeare.txt").read_text()[:n_docs * 300]
    return Dataset.from_dict({"text": [text[i:i + 300] for i in range(0, len(text), 300)]})


def lm_loss(model, tok, n_windows: int = 8) -> float:
    """Mean next-token loss over the corpus's first windows, in fp32."""
    ids = tok("".join(corpus()["text"]))["input_ids"][:n_windows * 32]
    x = torch.tensor(ids).view(n_windows, 32)
    with torch.no_grad():
        return model.float()(input_ids=x, labels=x).loss.item()


def config(tokens, **overrides):
    from hf_minitron.correction import CorrectionConfig

    return CorrectionConfig(tokens=tokens, **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """One correction of a bf16 teacher (8 steps), watched from inside the training loop."""
    from hf_minitron.correction import CorrectionTrainer, correct_teacher

    tok, teacher = tiny_tokenizer(), bf16_teacher(tiny_tokenizer())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tmp_path_factory.mktemp("correction") / "teacher-corrected"
    seen = []
    compute_loss = CorrectionTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(({p.dtype for p in model.parameters()}, out.exists()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(CorrectionTrainer, "compute_loss", spy)
        stage = correct_teacher(teacher, tok, corpus(), out, config(8 * STEP_TOKENS), progress=False)
    torch.set_num_threads(threads)
    return {"tok": tok, "teacher": teacher, "before": before, "out": out, "stage": stage, "seen": seen}


def test_corrected_teacher_has_a_lower_loss_on_the_correction_text(corrected):
    from transformers import AutoModelForCausalLM

    fixed = AutoModelForCausalLM.from_pretrained(corrected["out"])
    original = lm_loss(bf16_teacher(corrected["tok"]), corrected["tok"])
    assert lm_loss(fixed, corrected["tok"]) < original - 0.3
    probe = json.loads((corrected["out"] / "correction_result.json").read_text())["probe_loss"]
    assert probe["after"] < probe["before"] - 0.3 and probe["windows"] == 4


def test_trains_fp32_and_saves_in_the_teachers_dtype(corrected):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = corrected["out"]
    assert corrected["seen"] and all(dtypes == {torch.float32} for dtypes, _ in corrected["seen"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file()


def test_output_folder_appears_only_when_complete(corrected):
    out = corrected["out"]
    assert corrected["seen"] and not any(existed for _, existed in corrected["seen"])
    assert not list(out.glob("checkpoint-*")) and not out.with_name(out.name + ".tmp").exists()


def test_caller_teacher_is_left_unchanged(corrected):
    teacher = corrected["teacher"]
    assert teacher.dtype == torch.bfloat16
    assert all(torch.equal(v, corrected["before"][k]) for k, v in teacher.state_dict().items())


def test_stage_output_names_the_folder_tokens_and_losses(corrected):
    from hf_minitron.rundir import hash_folder

    stage = corrected["stage"]
    assert stage.path == corrected["out"] and stage.sha256 == hash_folder(corrected["out"])
    assert stage.tokens == {"teacher_correction": 8 * STEP_TOKENS}
    assert stage.record["steps"] == 8 and stage.record["probe_loss_after"] < stage.record["probe_loss_before"]


def test_finished_correction_is_returned_without_training(corrected, monkeypatch):
    from hf_minitron.correction import CorrectionTrainer, correct_teacher

    monkeypatch.setattr(CorrectionTrainer, "train", lambda *a, **k: pytest.fail("trained again"))
    stage = correct_teacher(corrected["teacher"], corrected["tok"], corpus(), corrected["out"],
                            config(8 * STEP_TOKENS))
    assert stage.sha256 == corrected["stage"].sha256 and stage.tokens == corrected["stage"].tokens
    with pytest.raises(ValueError, match="resume=False"):  # another budget: never the old result silently
        correct_teacher(corrected["teacher"], corrected["tok"], corpus(), corrected["out"], config(4 * STEP_TOKENS))


@pytest.mark.parametrize("tokens", [None, 0])
def test_no_budget_is_refused(tmp_path, tokens):
    from hf_minitron.correction import correct_teacher

    assert not config(tokens).enabled
    with pytest.raises(ValueError, match="teacher correction is off"):
        correct_teacher(tiny_model("llama"), tiny_tokenizer(), corpus(), tmp_path / "out", config(tokens))
    assert not (tmp_path / "out").exists()


def test_existing_folder_that_is_no_corrected_teacher_is_refused(tmp_path):
    from hf_minitron.correction import correct_teacher

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no corrected teacher"):
        correct_teacher(tiny_model("llama"), tiny_tokenizer(), corpus(), tmp_path / "out", config(STEP_TOKENS),
                        resume=False)
    assert (tmp_path / "out" / "notes.txt").is_file()


def test_interrupted_correction_resumes_from_its_last_checkpoint(tmp_path, one_thread, monkeypatch):
    from hf_minitron.correction import RESULT_FILE, CorrectionTrainer, correct_teacher, staging_folder

    tok = tiny_tokenizer()
    out = tmp_path / "teacher-corrected"
    correct_teacher(bf16_teacher(tok), tok, corpus(), out, config(2 * STEP_TOKENS, save_steps=1,
                                                                  keep_checkpoints=True), progress=False)
    staging = staging_folder(out)  # as a kill during step 3 leaves it: checkpoints 1-2, no model, no result
    shutil.move(out, staging)
    for name in (RESULT_FILE, "model.safetensors", "config.json"):
        (staging / name).unlink()
    steps = []
    compute_loss = CorrectionTrainer.compute_loss
    monkeypatch.setattr(CorrectionTrainer, "compute_loss", lambda self, *a, **k: steps.append(
        self.state.global_step) or compute_loss(self, *a, **k))
    stage = correct_teacher(bf16_teacher(tok), tok, corpus(), out, config(3 * STEP_TOKENS, save_steps=1),
                            progress=False)
    assert steps == [2] and stage.record["steps"] == 3  # only step 3 ran, from checkpoint-2
    assert (out / RESULT_FILE).is_file() and not list(out.glob("checkpoint-*"))


def test_recipe_section_takes_counts_and_zero_means_off():
    from hf_minitron.correction import CorrectionConfig
    from hf_minitron.schema import SettingError, from_mapping

    section = from_mapping(CorrectionConfig, {"tokens": "1M", "learning_rate": "2e-5", "min_lr": 2e-6,
                                              "max_length": 2048, "train_dtype": "float32"}, "teacher_correction")
    assert section.tokens == 1_000_000 and section.enabled and section.packing_strategy == "wrapped"
    assert not from_mapping(CorrectionConfig, {"tokens": 0}, "teacher_correction").enabled
    with pytest.raises(SettingError, match="teacher_correction.lr"):
        from_mapping(CorrectionConfig, {"lr": 1e-4}, "teacher_correction")
    with pytest.raises(SettingError, match="teacher_correction.tokens: must be at least 0"):
        from_mapping(CorrectionConfig, {"tokens": -5}, "teacher_correction")
