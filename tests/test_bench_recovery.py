"""bench/distill_recovery.py: the benchmark-domain text it may distil on never carries a scored task, and the
HellaSwag gap's standard error pairs the same tasks, and earlier figures stand only for the model they scored."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import distill_recovery  # noqa: E402
import hellaswag_bench  # noqa: E402


def _task(ctx: str, endings: list[str], label: int = 0) -> dict:
    return {"ctx": ctx, "endings": endings, "label": label}


def test_contexts_sharing_a_sentence_with_a_scored_task_are_left_out(tmp_path):
    tasks = [
        _task("Baking: A woman mixes flour and eggs in a bowl. she", ["pours the batter into a round pan.", "x", "y",
                                                                      "z"]),
        _task("Baking: She pours the batter into a round pan. she", ["a", "b", "c", "d"]),  # holds task 0's ending
        _task("Surfing: A man paddles out beyond the breaking waves. he", ["a", "b", "c", "d"]),
    ]
    (tmp_path / "hellaswag_val_dev.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    path = hellaswag_bench.write_hellaswag_contexts(str(tmp_path), 1, str(tmp_path))
    assert Path(path).read_text().splitlines() == [tasks[2]["ctx"]]


def test_the_gap_standard_error_pairs_the_same_tasks():
    a = {"hellaswag_norm_hits": [1, 1, 0, 0], "hellaswag_acc_norm": 0.5, "hellaswag_n": 4}
    same = dict(a)
    assert hellaswag_bench.paired_se(a, same) == 0.0  # identical answers: no uncertainty in the gap
    unpaired = {"hellaswag_acc_norm": 0.5, "hellaswag_n": 4}
    assert hellaswag_bench.paired_se(a, unpaired) > 0.3  # without per-task hits: sqrt(2 * 0.25 / 4)


def test_earlier_figures_are_reused_only_for_the_same_model_and_tasks(tmp_path):
    evals = {"teacher": {"source": "T", "hellaswag_n": 1000, "ppl_wikitext2_16x512": 29.6},
             "pruned": {"source": "/students/a", "hellaswag_n": 1000, "ppl_wikitext2_16x512": 59.3}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"evals": evals}))
    same = distill_recovery.reusable_evals(str(path), 1000, {"teacher": "T", "pruned": "/students/a"})
    assert set(same) == {"teacher", "pruned"}
    other_student = distill_recovery.reusable_evals(str(path), 1000, {"teacher": "T", "pruned": "/students/g"})
    assert set(other_student) == {"teacher"}
    assert distill_recovery.reusable_evals(str(path), 300, {"teacher": "T", "pruned": "/students/a"}) == {}


def test_teacher_continuations_keep_each_context_in_file_order(tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM
    from helpers import teacher_folder

    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder(tmp_path / "t", smollm2_tokenizer))
    side = smollm2_tokenizer.padding_side
    contexts = ["Washing face: A young girl is inside a bathroom with her dad. she",
                "Disc dog: The man throws. the dog", "Surfing: He paddles out. he"]
    path = tmp_path / "contexts.txt"
    path.write_text("\n".join(contexts) + "\n")
    out = hellaswag_bench.continue_with_teacher(teacher, smollm2_tokenizer, str(path), 5, 0.7, 0, batch_size=2)
    lines = Path(out).read_text().splitlines()
    assert len(lines) == 3
    for context, line in zip(contexts, lines):  # batched in length order, written in the file's
        assert line.startswith(context) and len(line) > len(context)
    assert smollm2_tokenizer.padding_side == side  # left padding only while generating


def test_distill_settings_are_read_as_a_recipe_reads_them_before_any_model_loads():
    import argparse

    import pytest

    args = argparse.Namespace(w_clm=0.25, distill=["is_layers=1:1,2:2", "learning_rate=6e-4"])
    assert distill_recovery.recovery_distill_settings(args) == {
        "w_clm": 0.25, "is_layers": "1:1,2:2", "learning_rate": 6e-4}
    with pytest.raises(SystemExit, match="learnig_rate"):
        distill_recovery.recovery_distill_settings(argparse.Namespace(w_clm=0.0, distill=["learnig_rate=1"]))
