"""Teacher-logit cache: written once (one process or several), resumed, refused when its inputs change; the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import DATA, text_dataset, tiny_llama, tiny_tokenizer

from hf_minitron.cached_distill import TeacherCache
from hf_minitron.teacher_cache import (META_FILE, TeacherCacheConfig, bytes_per_token, cache_windows, teacher_top_k,
                                       top_p_counts, write_teacher_cache)

VOCAB = 512


def _teacher(seed: int = 0):
    return tiny_llama(VOCAB, layers=2, seed=seed).eval()


def _write(tmp_path, name="cache", teacher=None, data=None, **cfg):
    cfg = {"max_tokens": 6 * 32, "seq_len": 32, "top_k": 8, "batch_size": 2, "shard_windows": 4, **cfg}
    return write_teacher_cache(teacher or _teacher(), tiny_tokenizer(), data or text_dataset(), str(tmp_path / name),
                               TeacherCacheConfig(**cfg), progress=False)


def test_cache_round_trips_through_datasets(tmp_path):
    from datasets import load_dataset

    teacher, data = _teacher(), text_dataset()
    meta = _write(tmp_path, teacher=teacher, data=data)
    folder = tmp_path / "cache"
    assert meta["complete"] and meta["windows"] == 6 and meta["shards"] == 2 and meta["tokens"] == 6 * 31
    assert meta["id_dtype"] == "uint16" and meta["logprob_dtype"] == "float16"
    assert meta["bytes_per_token"] == round(meta["bytes"] / meta["tokens"], 2)
    assert json.loads((folder / META_FILE).read_text()) == meta
    ds = load_dataset("arrow", data_files=sorted(str(p) for p in folder.glob("shard-*.arrow")), split="train")
    assert ds.features["topk_ids"].feature.dtype == "uint16"
    assert ds.features["topk_logprobs"].feature.dtype == "float16"
    windows = cache_windows(data, tiny_tokenizer(), 32, 6 * 32, seed=42)
    ids, logp, tail = teacher_top_k(teacher, windows, 8)
    row = TeacherCache(str(folder)).dataset()[5]
    assert (row["input_ids"] == windows[5].numpy()).all()
    assert (row["topk_ids"].reshape(31, 8) == ids[5].numpy()).all()
    np.testing.assert_allclose(row["topk_logprobs"].reshape(31, 8), logp[5].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(row["tail_logprob"], tail[5].numpy(), rtol=2e-3, atol=2e-3)


def test_a_cache_smaller_than_the_data_draws_its_windows_from_all_of_it():
    data, tok = text_dataset(), tiny_tokenizer()
    every = cache_windows(data, tok, 32, None)
    drawn, first = cache_windows(data, tok, 32, 4 * 32, seed=42), cache_windows(data, tok, 32, 4 * 32)
    assert len(every) > 8 and torch.equal(first, every[:4])
    rows = [next(i for i, w in enumerate(every) if torch.equal(w, d)) for d in drawn]
    assert rows == sorted(rows) and rows[-1] >= 4  # in corpus order, not only from its start
    assert torch.equal(drawn, cache_windows(data, tok, 32, 4 * 32, seed=42))


def test_cached_log_probs_and_tail_make_one_distribution(tmp_path):
    _write(tmp_path, logprob_dtype="float32")
    row = TeacherCache(str(tmp_path / "cache")).dataset()[0]
    total = np.exp(row["topk_logprobs"].reshape(31, 8)).sum(-1) + np.exp(row["tail_logprob"])
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@pytest.mark.parametrize("p, kept, tail", [(0.75, 2, 0.2), (0.85, 3, 0.1), (1.0, 4, 0.05), (0.1, 1, 0.5)])
def test_top_p_keeps_the_fewest_entries_whose_mass_reaches_p_and_moves_the_rest_to_the_tail(p, kept, tail):
    logp = torch.tensor([[0.5, 0.3, 0.1, 0.05]]).log()
    counts, new_tail = top_p_counts(logp, torch.tensor([0.05]).log(), p)
    assert counts.tolist() == [kept]
    torch.testing.assert_close(new_tail.exp(), torch.tensor([tail]))


def test_a_top_p_cache_keeps_fewer_entries_that_still_make_one_distribution(tmp_path):
    from hf_minitron.cached_distill import collate_cached

    sharp = {"top_k": 64, "logprob_dtype": "float32", "temperature": 0.05}  # a random teacher is near uniform
    full = _write(tmp_path, name="full", **sharp)
    meta = _write(tmp_path, top_p=0.5, **sharp)
    assert meta["top_p"] == 0.5 and meta["bytes_per_token"] < full["bytes_per_token"]
    assert abs(full["bytes_per_token"] / bytes_per_token(64, VOCAB, "float32") - 1) < 0.05  # + Arrow framing
    rows = [TeacherCache(str(tmp_path / "cache")).dataset()[i] for i in (0, 1)]
    assert rows[0]["topk_counts"].min() >= 1 and rows[0]["topk_counts"].max() < 64
    batch = collate_cached(rows)
    total = batch["topk_logprobs"].exp().sum(-1) + batch["tail_logprob"].exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=1e-5)
    reference = collate_cached([TeacherCache(str(tmp_path / "full")).dataset()[i] for i in (0, 1)])
    first = batch["topk_ids"][..., 0]
    assert torch.equal(first, reference["topk_ids"][..., 0])  # the most likely token is always kept


def test_an_interrupted_cache_resumes_at_its_first_missing_shard(tmp_path, monkeypatch):
    import hf_minitron.teacher_cache as tc

    fresh = _write(tmp_path, name="fresh")
    _write(tmp_path)
    folder = tmp_path / "cache"
    meta = json.loads((folder / META_FILE).read_text())
    (folder / "shard-00001.arrow").unlink()  # killed while writing shard 1: only its temporary file is left
    (folder / "shard-00001.arrow.tmp").write_bytes(b"half a shard")
    (folder / META_FILE).write_text(json.dumps({**meta, "complete": False}))
    seen = []
    real = tc.teacher_top_k
    monkeypatch.setattr(tc, "teacher_top_k", lambda teacher, x, *a: seen.append(len(x)) or real(teacher, x, *a))
    resumed = _write(tmp_path)
    assert seen == [2]  # shard 1 holds windows 4 and 5: one batch; shard 0 was kept
    assert not list(folder.glob("*.tmp"))
    for name in ("shard-00000.arrow", "shard-00001.arrow"):
        assert (folder / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert {k: v for k, v in resumed.items() if k != "teacher"} == {k: v for k, v in fresh.items() if k != "teacher"}


@pytest.mark.parametrize("change, message", [
    ({"top_k": 16}, "another top_k"), ({"seq_len": 16}, "another seq_len"), ({"top_p": 0.9}, "another top_p"),
    ({"teacher": "other"}, "another teacher"), ({"data": "other"}, "another data"),
])
def test_resuming_a_cache_of_other_inputs_is_refused(tmp_path, change, message):
    _write(tmp_path)
    kwargs = dict(change)
    if kwargs.pop("teacher", None):
        kwargs["teacher"] = _teacher(seed=1)
    if kwargs.pop("data", None):
        kwargs["data"] = text_dataset(30)
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, **kwargs)


def test_teacher_logits_and_distill_commands(tmp_path, capsys, one_thread):
    from helpers import teacher_folder

    from hf_minitron.cli import main

    teacher = teacher_folder(tmp_path / "teacher", tiny_tokenizer(), num_hidden_layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:20_000])
    cache = tmp_path / "cache"
    common = ["--data", str(corpus)]
    assert main(["teacher-logits", "--teacher", str(teacher), *common, "--max-tokens", "256", "--seq-len", "32",
                 "--top-k", "16", "--out", str(cache)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["windows"] == 8 and printed["top_k"] == 16 and printed["bytes_per_token"] > 16 * 4
    student = tmp_path / "student"
    tiny_llama(VOCAB, layers=1).save_pretrained(student)
    tiny_tokenizer().save_pretrained(student)
    train = ["distill", "--student", str(student), "--tokens", "128", "--per-device-train-batch-size", "2",
             "--save-strategy", "steps", "--report-to", "none", "--teacher-cache", str(cache)]
    assert main([*train, "--out", str(tmp_path / "a")]) == 0  # no --teacher, no --data
    assert main([*train, "--teacher", str(teacher), *common, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text((DATA / "tinyshakespeare.txt").read_text()[20_000:40_000])
    assert main([*train, "--data", str(other), "--out", str(tmp_path / "c")]) == 2
    assert "other data" in capsys.readouterr().err
    assert main([*train, "--is-layers", "0:0", "--out", str(tmp_path / "d")]) == 2
    assert "need the live teacher" in capsys.readouterr().err


CACHE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distill import text_dataset, tiny_llama, tiny_tokenizer
from hf_minitron.teacher_cache import TeacherCacheConfig, write_teacher_cache
config = TeacherCacheConfig(max_tokens=6 * 32, seq_len=32, top_k=8, batch_size=2, shard_windows=2)
write_teacher_cache(tiny_llama(512, layers=2, seed=0).eval(), tiny_tokenizer(), text_dataset(), sys.argv[1], config,
                    progress=False)
from accelerate import PartialState
PartialState().destroy_process_group()  # before exit: a group left to the interpreter's teardown can abort a rank
"""


def test_two_processes_write_the_shards_one_process_writes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "write.py"
    script.write_text(CACHE_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                    str(tmp_path / "two")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    one, two = TeacherCache(str(tmp_path / "one")), TeacherCache(str(tmp_path / "two"))
    assert (two.meta["processes"], one.meta["processes"], two.meta["shards"]) == (2, 1, 3)
    assert two.meta["windows_sha256"] == one.meta["windows_sha256"] and two.meta["bytes"] == one.meta["bytes"]
    for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
        np.testing.assert_array_equal(np.stack(two.dataset()[name]), np.stack(one.dataset()[name]))


def test_tail_mass_from_the_top_k_alone_matches_the_full_vocabulary():
    from hf_minitron.teacher_cache import _tail

    z = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 4
    log_z = z.logsumexp(-1, keepdim=True)
    top, ids = z.topk(50, dim=-1)
    exact = z.scatter(-1, ids, float("-inf")).logsumexp(-1) - log_z[:, 0]
    assert torch.allclose(_tail(top - log_z, 1000).exp(), exact.exp(), rtol=0, atol=1e-6)  # in probability mass
    assert torch.isneginf(_tail(z - log_z, 1000)).all()
