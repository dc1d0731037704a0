"""The command line end to end on a tiny teacher folder: importance once, prune to two targets, reload."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import teacher_folder

from hf_minitron.cli import build_parser, main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, smollm2_tokenizer):
    return teacher_folder(tmp_path_factory.mktemp("teacher"), smollm2_tokenizer)


def test_importance_then_two_prune_targets(teacher_dir, tmp_path, capsys):
    scores = tmp_path / "scores"
    assert main(["importance", "--teacher", str(teacher_dir), "--data", "pydoc-topics", "--samples", "4",
                 "--seq-len", "64", "--out", str(scores), "--depth-ppl-samples", "2"]) == 0
    meta = json.loads((scores / "importance.json").read_text())
    assert meta["data"]["path"] == "pydoc-topics" and meta["teacher"]["source"] == str(teacher_dir)
    for name, flags in [("width", ["--hidden-size", "48", "--ffn-size", "64", "--num-heads", "2"]),
                        ("depth", ["--num-layers", "2", "--depth-metric", "bi"])]:
        out = tmp_path / name
        assert main(["prune", "--teacher", str(teacher_dir), "--importance", str(scores), *flags,
                     "--out", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.chat_template and json.loads((out / "pruning.json").read_text())["student_parameters"] == \
            model.num_parameters()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "width").config.head_dim == 16
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "depth").config.num_hidden_layers == 2
    # finished work is never overwritten silently
    assert main(["importance", "--teacher", str(teacher_dir), "--data", "pydoc-topics", "--samples", "4",
                 "--seq-len", "64", "--out", str(scores)]) == 2
    assert main(["prune", "--teacher", str(teacher_dir), "--importance", str(scores), "--out",
                 str(tmp_path / "width")]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "not empty" in err


def test_impossible_target_fails_before_loading(teacher_dir, tmp_path, capsys):
    main(["importance", "--teacher", str(teacher_dir), "--data", "pydoc-topics", "--samples", "2", "--seq-len", "32",
          "--out", str(tmp_path / "s"), "--depth-ppl-samples", "0"])
    assert main(["prune", "--teacher", str(teacher_dir), "--importance", str(tmp_path / "s"), "--ffn-size", "999",
                 "--out", str(tmp_path / "p")]) == 2
    assert "ffn size 999 must be in 1..128" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_every_flag_has_help():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_distill_takes_the_teacher_as_a_folder_plus_gguf_file(smollm2_path, smollm2_tokenizer, tmp_path, one_thread):
    """The real SmolLM2 GGUF teacher named as folder + --gguf-file (as a Hub repo at a revision would be), distilled
    into a tiny student with its tokenizer: the flags every other command takes work for distill too."""
    student = teacher_folder(tmp_path / "student", smollm2_tokenizer, num_hidden_layers=2)
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(smollm2_path.parent), "--gguf-file", smollm2_path.name,
                 "--dtype", "float32", "--student", str(student), "--data", "pydoc-topics", "--out", str(out),
                 "--tokens", "64", "--max-length", "32", "--per-device-train-batch-size", "2"]) == 0
    result = json.loads((out / "distill_result.json").read_text())
    assert result["steps"] == 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
