"""Distilling from a teacher-logit cache: the teacher never loaded, the live loss curve, what it cannot serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import text_dataset, tiny_llama, tiny_tokenizer
from test_teacher_cache import VOCAB, _teacher, _write

from hf_minitron.cached_distill import TeacherCache
from hf_minitron.teacher_cache import META_FILE, cache_windows


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
           "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3, "is_layers": "off", "seed": 0,
           "bf16": False, **cfg}  # fp32: the live and cached curves are compared to 1e-4
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


def test_distill_from_a_top_p_cache_trains(tmp_path, one_thread):
    _write(tmp_path, top_k=32, top_p=0.9, max_tokens=8 * 32)
    result = _distill(tmp_path, "cached", None, text_dataset(), teacher_cache=str(tmp_path / "cache"))
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
