"""The plan printed before a build: its rows, FLOPs and disk from configs alone, the measured time estimate."""

import json

import pytest

from helpers import teacher_and_corpus

from hf_minitron.cost import forward_flops, train_flops
from hf_minitron.plan import Calibration, calibrate, format_plan, measure, plan_rows, print_plan
from hf_minitron.recipe import from_dict


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    return teacher_and_corpus(tmp_path_factory.mktemp("plan"), smollm2_tokenizer)


def recipe(files, **changes):
    corpus = str(files / "corpus.jsonl")
    raw = {"name": "tiny", "teacher": {"source": str(files / "teacher"), "dtype": "float32"},
           "data": {"calibration": corpus, "distillation": corpus, "holdout": 0.2, "sft": corpus},
           "importance": {"samples": 4, "seq_len": 32, "depth_ppl_samples": 0}, "prune": {"depth_metric": "bi"},
           "members": [{"name": "small", "params": 2_950_000},
                       {"name": "smaller", "parent": "small", "shape": {"ffn_size": 64}, "instruct": True}],
           "search": {"tolerance": 0.1, "multiple": 8, "max_candidates": 2, "tokens": 256, "eval_every": 64,
                      "seq_len": 32, "batch_size": 2, "eval_windows": 2, "eval_seq_len": 32},
           "distill": {"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4},
           "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64},
           "evaluate": {"seq_len": 32, "windows": 2}}
    raw.update(changes)
    return from_dict(raw)


def test_rows_cover_every_stage_with_the_build_formulas(files):
    r = recipe(files)
    rows = {(row.member, row.stage): row for row in plan_rows(r)}
    assert list(rows) == [("teacher", "evaluate"), ("teacher", "importance"), ("small", "search"),
                          ("small", "prune"), ("small", "distill"), ("small", "evaluate"), ("small", "importance"),
                          ("smaller", "prune"), ("smaller", "distill"), ("smaller-instruct", "sft"),
                          ("smaller", "evaluate"), ("smaller-instruct", "evaluate")]
    teacher, small, smaller = (rows[(n, s)].params for n, s in (("teacher", "evaluate"), ("small", "distill"),
                                                               ("smaller", "distill")))
    assert rows[("teacher", "importance")].flops == forward_flops(teacher, 4 * 32)
    assert rows[("small", "distill")].flops == train_flops(small, 256, teacher)
    assert rows[("smaller", "distill")].flops == train_flops(smaller, 256, small)  # distilled from its parent
    assert rows[("smaller-instruct", "sft")].tokens == 2 * 2 * 64
    assert rows[("smaller", "prune")].disk == smaller * 4  # float32 weights
    search = rows[("small", "search")]
    assert search.model.startswith("2 candidates") and search.tokens == 2 * 256
    assert 0 < search.low_flops < search.flops  # the ranking may settle after 2 of its 4 intervals


def test_a_teacher_cache_is_planned_once_and_the_stages_reading_it_skip_the_teachers_flops(files):
    r = recipe(files, distill={"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4,
                               "teacher_cache": "auto", "teacher_cache_top_k": 16})
    rows = {(row.member, row.stage): row for row in plan_rows(r)}
    teacher, small = rows[("teacher", "evaluate")].params, rows[("small", "distill")].params
    cache = rows[("small", "teacher-logits")]
    assert cache.tokens == 256 and cache.flops == forward_flops(teacher, 256)  # search: 256 tokens of 32 too
    assert cache.disk == 256 * (17 * 2 + 17 * 2)  # uint16 ids (the input and K) and fp16 log-probs (K and the tail)
    assert rows[("small", "distill")].flops == train_flops(small, 256)
    assert rows[("smaller", "teacher-logits")].params == small  # the chain's next member: its parent's logits


def test_the_table_states_totals_and_the_estimate_with_its_basis(files):
    r = recipe(files)
    rows = plan_rows(r)
    text = format_plan(r, rows, Calibration({"forward": 3e9, "train": 1e9, "distill": 2e9}, "BASIS"))
    assert "plan: family 'tiny'" in text and "total: ~" in text and "BASIS" in text
    rate = {"forward": 3e9, "train": 1e9, "distill": 2e9}
    high = sum(f / rate[k] for row in rows for k, f in (row.work or {}).items())
    low = high - sum(f / rate[k] for row in rows if row.low_work for k, f in row.work.items()) \
        + sum(f / rate[k] for row in rows if row.low_work for k, f in row.low_work.items())
    assert f"~{round((low + high) / 2)} s (from {round(low)} s" in text
    assert "estimated wall time" not in format_plan(r, rows, None)


def test_on_policy_distillation_is_named_as_outside_the_totals(files):
    r = recipe(files, distill={"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4, "on_policy": 0.25,
                               "on_policy_prompt": 8})
    text = format_plan(r, plan_rows(r), None)
    assert "distill.on_policy 0.25: that share of the distillation steps first samples each window past its " \
           "first 8 tokens" in text
    assert "on_policy" not in format_plan(recipe(files), plan_rows(recipe(files)), None)


def test_unlikelihood_steps_are_named_as_outside_the_totals(files):
    r = recipe(files, distill={"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4,
                               "unlikelihood": 0.5, "unlikelihood_tokens": 16, "on_policy_prompt": 8})
    text = format_plan(r, plan_rows(r), None)
    assert "distill.unlikelihood 0.5: that share of the distillation steps also decodes 16 greedy tokens" in text
    assert "in the time estimate at 1.9x a plain step" in text
    assert "unlikelihood" not in format_plan(recipe(files), plan_rows(recipe(files)), None)


def test_one_members_unlikelihood_is_named_with_the_member(files):
    r = recipe(files, distill={"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4})
    r.members[-1].distill = {"unlikelihood": 1.0}
    text = format_plan(r, plan_rows(r), None)
    assert f"distill.unlikelihood 1 ({r.members[-1].name}): that share" in text


def test_calibration_times_real_steps_of_the_teacher_shape_quickly(files):
    import time

    r = recipe(files)
    start = time.time()
    c = calibrate(r, r.teacher.model_config())
    assert set(c.rates) == {"forward", "train", "distill"} and all(v > 0 for v in c.rates.values())
    assert "steps of 4 x 32 tokens" in c.basis and "added up to its 4 layers" in c.basis
    assert time.time() - start < 30


@pytest.mark.parametrize("bf16", [True, False])
def test_calibration_times_training_steps_in_the_builds_precision(files, monkeypatch, bf16):
    import torch

    import hf_minitron.losses as losses

    seen, real = set(), losses.chunked_logit_losses

    def recording(*args, **kwargs):  # called only by the timed distillation steps
        seen.add(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "chunked_logit_losses", recording)
    r = recipe(files)
    r.distill["bf16"] = bf16
    c = calibrate(r, r.teacher.model_config())
    assert seen == {bf16} and ("bf16 autocast" in c.basis) == bf16


def test_no_estimate_when_the_teacher_device_is_missing(files, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = recipe(files, teacher={"source": str(files / "teacher"), "device": "cuda"})
    calibration, why = measure(r, r.teacher.model_config())
    assert calibration is None and "cuda is not on this machine" in why
    assert "no time estimate: the teacher's device cuda" in print_plan(r, log=lambda _: None)


@pytest.mark.usefixtures("one_thread")
def test_a_build_prints_the_plan_before_loading_and_its_flops_are_what_it_records(files, tmp_path):
    from hf_minitron.pipeline import build

    r = recipe(files, members=[{"name": "small", "shape": {"ffn_size": 64}}])
    lines = []
    build(r, tmp_path / "run", progress=False, log=lines.append)
    text = "\n".join(lines)
    assert text.index("plan: family 'tiny'") < text.index("loading teacher")
    assert "[small/distill] done in 0:" in text and "tokens/s" in text  # the stage's end line
    assert f"hf-minitron space {tmp_path / 'run'}" in text and "family card:" in text
    planned = {(row.member, row.stage): row.flops for row in plan_rows(r)}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["small/distill"]["flops"] == planned[("small", "distill")]
    assert manifest["stages"]["importance/teacher"]["flops"] == planned[("teacher", "importance")]


def test_a_members_unlikelihood_steps_lengthen_its_estimated_distillation(files):
    from hf_minitron.plan import UNLIKELIHOOD_EXTRA

    r = recipe(files, distill={"tokens": 256, "max_length": 32, "per_device_train_batch_size": 4})
    calibration = Calibration({"forward": 1e9, "train": 1e9, "distill": 1e9}, "test rates")
    plain = {row.member: row.seconds(calibration) for row in plan_rows(r) if row.stage == "distill"}
    r.members[-1].distill = {"unlikelihood": 0.5}
    slowed = {row.member: row.seconds(calibration) for row in plan_rows(r) if row.stage == "distill"}
    last, first = r.members[-1].name, r.members[0].name
    assert slowed[last] == pytest.approx(plain[last] * (1 + 0.5 * UNLIKELIHOOD_EXTRA))
    assert slowed[first] == plain[first]
