"""Teacher-logit cache: written once, read by distill without the teacher, refused when it is not the run's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import DATA, text_dataset, tiny_llama, tiny_tokenizer

from hf_minitron.teacher_cache import (META_FILE, TeacherCache, TeacherCacheConfig, cache_windows, teacher_top_k,
                                       write_teacher_cache)

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
    ({"top_k": 16}, "another top_k"), ({"seq_len": 16}, "another seq_len"),
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


def test_a_cache_is_refused_for_another_tokenizer_teacher_or_data(tmp_path):
    _write(tmp_path)
    cache = TeacherCache(str(tmp_path / "cache"))
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        cache.check(other_tok)
    with pytest.raises(ValueError, match="holds the logits of"):
        cache.check(tiny_tokenizer(), teacher=_teacher(seed=1))
    with pytest.raises(ValueError, match="other data"):
        cache.check(tiny_tokenizer(), data=text_dataset(30))
    cache.check(tiny_tokenizer(), teacher=_teacher(), data=text_dataset())  # its own inputs pass


def test_an_incomplete_cache_is_not_trained_from(tmp_path):
    _write(tmp_path)
    path = tmp_path / "cache" / META_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(str(tmp_path / "cache"))


# ---- distill from the cache ----------------------------------------------------------------------------------
def _distill(tmp_path, name, teacher, data, text_column="text", **cfg):
    from hf_minitron.distill import distill

    cfg = {"max_length": 32, "per_device_train_batch_size": 2, "kd_chunk_tokens": 16, "report_to": [],
           "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3, "is_layers": "off", "seed": 0, **cfg}
    return distill(teacher, tiny_llama(VOCAB, layers=1, seed=3), data, str(tmp_path / name), 4 * 64,
                   tokenizer=tiny_tokenizer(), text_column=text_column, **cfg)


def test_distill_from_a_full_cache_never_loads_the_teacher_and_follows_the_live_loss_curve(tmp_path, monkeypatch,
                                                                                            one_thread):
    import hf_minitron.distill as distill_module
    from datasets import Dataset

    teacher, data = _teacher(), text_dataset()
    _write(tmp_path, teacher=teacher, data=data, top_k=VOCAB, logprob_dtype="float32", max_tokens=8 * 32)
    windows = cache_windows(data, tiny_tokenizer(), 32, 8 * 32, seed=42)
    live = _distill(tmp_path, "live", teacher, Dataset.from_dict({"input_ids": windows.tolist()}), "input_ids")

    def only_loaded(spec, *a):  # the student is given loaded; any teacher load would come here
        if not isinstance(spec, torch.nn.Module):
            raise AssertionError(f"a model was loaded from {spec!r}")
        return spec, None

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill_module, "load_model_spec", only_loaded)
    monkeypatch.setattr("hf_minitron.models.load_model", no_load)
    cached = _distill(tmp_path, "cached", None, None, teacher_cache=str(tmp_path / "cache"))
    curve = [[h["kd_logit"] for h in r["log_history"] if "kd_logit" in h] for r in (live, cached)]
    assert len(curve[0]) == 4 and cached["teacher_cache"] == str(tmp_path / "cache")
    np.testing.assert_allclose(curve[1], curve[0], rtol=1e-4)


def test_distill_from_a_small_k_cache_trains(tmp_path, one_thread):
    _write(tmp_path, top_k=4, max_tokens=8 * 32)
    result = _distill(tmp_path, "cached", None, text_dataset(), teacher_cache=str(tmp_path / "cache"), w_clm=0.5)
    kd = [h["kd_logit"] for h in result["log_history"] if "kd_logit" in h]
    assert all(np.isfinite(kd)) and all(k >= 0 for k in kd) and result["steps"] == 4


@pytest.mark.parametrize("settings, message", [
    ({"is_layers": "0:0"}, "need the live teacher"), ({"is_sites": ["attention"]}, "need the live teacher"),
    ({"logit_loss": "reverse_kl"}, "forward_kl"), ({"temperature": 2.0}, "temperature"),
])
def test_settings_a_cache_cannot_serve_are_refused(tmp_path, settings, message):
    _write(tmp_path)
    with pytest.raises(ValueError, match=message):
        _distill(tmp_path, "cached", None, None, teacher_cache=str(tmp_path / "cache"), **settings)


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
