"""The search's retraining: LoRA plus the norms (and embeddings) hidden pruning disturbs, full mode, segments that
resume into the same weights as one run."""

import copy

import pytest
import torch
from test_distill import text_dataset, tiny_llama, tiny_tokenizer

from hf_minitron.importance import compute_importance
from hf_minitron.prune import PruneTarget, prune_model
from hf_minitron.search import SearchConfig as SearchSection
from hf_minitron.search_train import train_segment, wrap

pytestmark = pytest.mark.usefixtures("one_thread")


def _student_and_teacher(tied=False):
    tok = tiny_tokenizer()
    teacher = tiny_llama(len(tok), hidden=64, layers=2, inter=128, seed=1, tied=tied).eval()
    torch.manual_seed(0)
    scores = compute_importance(teacher, torch.randint(0, len(tok), (4, 32)), progress=False)
    student, _ = prune_model(teacher, scores, PruneTarget(hidden_size=48, ffn_size=96))
    return tok, teacher, student


def _train(student, teacher, tok, search, folder, stop=2, steps=2, resume=None, seed=3):
    model = wrap(student, search, teacher.config, seed)
    return train_segment(model, teacher, tok, text_dataset(), search, folder, steps, stop, resume, seed, False)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_also_trains_norms_and_the_embeddings_of_a_hidden_pruned_shape(tmp_path, tied):
    tok, teacher, student = _student_and_teacher(tied)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    search = SearchSection(seq_len=32, batch_size=2, lora_r=4, lora_alpha=8, lr=1e-2)
    model = _train(student, teacher, tok, search, tmp_path / "c")
    merged = model.merge_and_unload()
    after = merged.state_dict()
    norms = [k for k in after if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    assert len(norms) == 5 and all(not torch.equal(after[k], before[k]) for k in norms)
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied  # tying kept through the merge
    # a shape that keeps the hidden size keeps its embeddings frozen; "norms" never trains them
    keeps_hidden = wrap(tiny_llama(len(tok), hidden=64, layers=2, inter=96), search, teacher.config, 0)
    norms_only = wrap(copy.deepcopy(student), SearchSection(lora_also_train="norms"), teacher.config, 0)
    for m in (keeps_hidden, norms_only):
        trained = {n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n}
        assert trained and all("norm" in n for n in trained)


def test_full_mode_retrains_every_weight(tmp_path):
    tok, teacher, student = _student_and_teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    model = _train(student, teacher, tok, SearchSection(mode="full", seq_len=32, batch_size=2, lr=1e-3), tmp_path)
    assert model is student and not hasattr(model, "peft_config")
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_a_half_precision_student_trains_in_fp32(tmp_path):
    tok, teacher, student = _student_and_teacher()
    model = _train(student.to(torch.bfloat16), teacher.to(torch.bfloat16), tok,
                   SearchSection(seq_len=32, batch_size=2, lora_r=4, lora_alpha=8), tmp_path, stop=1, steps=1)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_segments_resume_into_the_same_weights_as_one_run(tmp_path, monkeypatch):
    """A candidate trained in two segments (checkpoint, fresh process state, resume) ends where one run ends,
    whatever random work ran before (the adapters' init is seeded)."""
    from hf_minitron.distill import MinitronDistillTrainer

    search = SearchSection(seq_len=32, batch_size=2, lora_r=4, lora_alpha=8, lr=1e-2)
    tok, teacher, student = _student_and_teacher()
    whole = _train(copy.deepcopy(student), teacher, tok, search, tmp_path / "whole", stop=3, steps=3)
    _train(copy.deepcopy(student), teacher, tok, search, tmp_path / "parts", stop=1, steps=3)
    torch.manual_seed(5)
    torch.rand(100)  # some other random work in between
    steps, real = [], MinitronDistillTrainer.training_step
    monkeypatch.setattr(MinitronDistillTrainer, "training_step", lambda self, *a, **kw: steps.append(1) or real(
        self, *a, **kw))
    parts = _train(copy.deepcopy(student), teacher, tok, search, tmp_path / "parts", stop=3, steps=3,
                   resume=tmp_path / "parts" / "checkpoint-1")
    assert len(steps) == 2  # steps 2 and 3 only: step 1 came from the checkpoint
    a, b = whole.state_dict(), parts.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
