"""The family report: the comparison table, the plot, the family card and the report folder."""

from __future__ import annotations

import json

import pytest

from hf_minitron.cards import CardError
from hf_minitron.report import (family_rows, family_table, plot_family, plot_recovery, recovery_curve,
                                render_family_card, write_family_report)
from hf_minitron.rundir import CARD_FILE, FAMILY_PLOT, FAMILY_RESULTS_FILE, FAMILY_TABLE_FILE, RECOVERY_PLOT

TEACHER = {"model": "teacher", "parameters": 135_000_000,
           "perplexity": [{"data": "w.txt", "seq_len": 512, "perplexity": 26.1}],
           "tasks": {"hs": {"metrics": {"acc": 0.377, "acc_norm": 0.44}}}}
SMALL = {"model": "m-90M", "parameters": 90_000_000,
         "perplexity": [{"data": "w.txt", "seq_len": 512, "perplexity": 40.0}],
         "tasks": {"hs": {"metrics": {"acc": 0.3, "acc_norm": 0.35}}}}


def test_family_rows_are_largest_first():
    columns, rows = family_rows([SMALL, TEACHER])
    assert columns == ["ppl w", "hs acc_norm"], "perplexity first, then one primary metric per task"
    assert [r["model"] for r in rows] == ["teacher", "m-90M"]


def test_family_table_header():
    lines = family_table([SMALL, TEACHER]).splitlines()
    assert lines[0] == "| model | parameters | size | ppl w | hs acc_norm |"


def test_family_table_rows_give_size_and_share_of_the_largest():
    lines = family_table([SMALL, TEACHER]).splitlines()
    assert lines[2].startswith("| teacher | 135M | 100% | 26.1 | 0.44 |"), lines[2]
    assert lines[3].startswith("| m-90M | 90M | 67%"), lines[3]


def test_family_table_without_results_raises():
    with pytest.raises(CardError, match="no evaluation results"):
        family_table([])


def test_plot_family_writes_a_png(tmp_path):
    png = plot_family([TEACHER, SMALL], tmp_path / FAMILY_PLOT)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000, "an empty figure is smaller"


def test_family_card_holds_table_plot_and_member_links():
    text = render_family_card([TEACHER, SMALL], "tiny family", teacher="HuggingFaceTB/SmolLM2-135M-Instruct",
                              members={"m-90M": "https://hf.co/org/m-90M"}, plot=FAMILY_PLOT, license="apache-2.0")
    assert "![quality vs parameters](family.png)" in text
    assert "[m-90M](https://hf.co/org/m-90M)" in text
    assert family_table([TEACHER, SMALL]) in text


def test_write_family_report_files(tmp_path):
    paths = write_family_report([TEACHER, SMALL], tmp_path / "family", "tiny family", teacher="teacher")
    assert paths["results"].name == FAMILY_RESULTS_FILE
    assert json.loads(paths["results"].read_text())[0]["model"] == "teacher"
    assert paths["table"].name == FAMILY_TABLE_FILE
    assert paths["table"].read_text() == family_table([TEACHER, SMALL])
    assert paths["plot"].is_file()
    assert paths["card"].name == CARD_FILE
    assert "![quality vs parameters](family.png)" in paths["card"].read_text()


DISTILLED = {"tokens_per_step": 1024, "log_history": [
    {"step": 1, "loss": 2.0, "kd_logit": 1.5}, {"step": 2, "loss": 1.2, "kd_logit": 1.0},
    {"step": 2, "train_loss": 1.6, "train_runtime": 3.0}]}


def test_recovery_curve_is_the_kd_loss_against_tokens():
    assert recovery_curve(DISTILLED) == [(1024, 1.5), (2048, 1.0)]
    assert recovery_curve(None) == []


def test_plot_recovery_needs_a_curve_of_two_points(tmp_path):
    assert plot_recovery({"m": [(1024, 1.5)]}, tmp_path / RECOVERY_PLOT) is None
    png = plot_recovery({"m": recovery_curve(DISTILLED)}, tmp_path / RECOVERY_PLOT)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_family_report_shows_the_recovery_curves(tmp_path):
    paths = write_family_report([TEACHER, SMALL], tmp_path / "family", "tiny family", teacher="teacher",
                                curves={"m-90M": recovery_curve(DISTILLED)})
    assert paths["recovery"].is_file()
    assert f"![recovery by distillation]({RECOVERY_PLOT})" in paths["card"].read_text()
