"""One vocabulary: every stage's recipe section and its CLI flags are the same fields with the same defaults."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from hf_minitron.cli import build_parser, main
from hf_minitron.distill import EXCLUDED as DISTILL_EXCLUDED
from hf_minitron.distill import DistillConfig
from hf_minitron.evaluate import EvaluateConfig
from hf_minitron.importance import ImportanceConfig
from hf_minitron.models import ModelArgs, TeacherArgs
from hf_minitron.prune import PruneConfig, PruneTarget
from hf_minitron.publish import PublishConfig
from hf_minitron.recipe import Recipe
from hf_minitron.schema import SettingError, default_of, from_mapping, settable
from hf_minitron.sft import EXCLUDED as SFT_EXCLUDED
from hf_minitron.sft import InstructConfig

# command -> (recipe section, its config class, fields neither may set: the stage sets them from its inputs)
STAGES = {
    "importance": ("importance", ImportanceConfig, ()),
    "prune": ("prune", PruneConfig, ()),
    "distill": ("distill", DistillConfig, DISTILL_EXCLUDED),
    "sft": ("sft", InstructConfig, SFT_EXCLUDED),
    "eval": ("evaluate", EvaluateConfig, ()),
    "publish": ("publish", PublishConfig, ()),
}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def section_dests(command: str, section: str) -> dict[str, argparse.Action]:
    return {a.dest.split(".", 1)[1]: a for a in subparser(command)._actions if a.dest.startswith(section + ".")}


@pytest.mark.parametrize("command", STAGES)
def test_every_recipe_key_is_a_flag_and_every_flag_a_recipe_key(command):
    section, cls, excluded = STAGES[command]
    flags = set(section_dests(command, section))
    # build_only: recipe keys about the build itself (evaluate.teacher: also score the teacher)
    keys = {n for n, f in settable(cls, excluded).items() if not f.metadata.get("build_only")}
    assert flags == keys


@pytest.mark.parametrize("command", STAGES)
def test_recipe_section_is_the_stage_config(command):
    section, cls, _ = STAGES[command]
    field_type = {f.name: f for f in fields(Recipe)}[section]
    default = default_of(field_type)
    assert isinstance(default, cls) or default == {}, f"recipe section {section} is not {cls.__name__}"


@pytest.mark.parametrize("command", STAGES)
def test_flag_help_states_the_config_default(command):
    section, cls, _ = STAGES[command]
    for name, action in section_dests(command, section).items():
        f = settable(cls)[name]
        if action.required:
            continue
        shown = default_of(f)
        shown = getattr(shown, "value", shown)
        shown = ",".join(map(str, shown)) or "none" if isinstance(shown, list) else "none" if shown is None else shown
        assert f"(default: {shown})" in action.help, f"--{name} help does not state the default {shown}"


def test_teacher_section_is_the_model_flags():
    assert set(settable(ModelArgs)) <= set(settable(TeacherArgs))
    for command in ("importance", "prune", "params", "distill"):
        dests = {a.dest for a in subparser(command)._actions}
        assert {f"teacher.{n}" for n in settable(ModelArgs)} <= dests, command


def test_distill_takes_a_pinned_hub_teacher_and_a_gguf_file():
    args = build_parser().parse_args(["distill", "--teacher", "org/name", "--revision", "abc123", "--gguf-file",
                                      "m.gguf", "--student", "s", "--student-revision", "v1", "--data", "d",
                                      "--out", "o", "--tokens", "1M"])
    assert vars(args)["teacher.revision"] == "abc123"
    assert vars(args)["teacher.gguf_file"] == "m.gguf"
    assert vars(args)["student.revision"] == "v1"


def test_sft_command_and_recipe_share_defaults():
    flags = section_dests("sft", "sft")
    assert "(default: 1.0)" in flags["num_train_epochs"].help
    assert "(default: 0.0001)" in flags["learning_rate"].help
    assert "(default: True)" in flags["lora"].help


def test_flag_values_go_through_the_recipe_checks(capsys):
    assert main(["importance", "--teacher", "x", "--data", "d", "--out", "o", "--samples", "many"]) == 2
    assert "--samples: expected an integer" in capsys.readouterr().err


def test_counts_with_suffixes_work_as_flags():
    from hf_minitron.schema import given

    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o",
                                      "--tokens", "2M", "--is-layers", "0:0,2:1"])
    values = given(args, "distill", DistillConfig)
    assert values == {"tokens": 2_000_000, "is_layers": "0:0,2:1"}


def test_literal_fields_refuse_other_values():
    with pytest.raises(SettingError, match="prune.depth_metric: 'deep' is not one of ppl, ppl-run, bi, bi-run"):
        from_mapping(PruneConfig, {"depth_metric": "deep"}, "prune")


def test_target_lists_take_commas():
    assert from_mapping(PruneTarget, {"drop_layers": "3,4"}).drop_layers == [3, 4]


def test_a_layer_pair_in_yaml_stays_a_string_not_a_base_60_number():
    from hf_minitron.schema import load_yaml

    assert load_yaml("1:1", "x") == "1:1" and load_yaml("{is_layers: 29:29}", "x") == {"is_layers": "29:29"}
    assert load_yaml("6.0e-4", "x") == 6e-4 and load_yaml("3", "x") == 3 and load_yaml("0x10", "x") == 16


def test_is_layers_off_in_yaml_stays_the_word_not_false():
    from hf_minitron.schema import check_mapping, load_yaml

    section = load_yaml("{is_layers: off, gradient_checkpointing: off, bf16: yes}", "distill")
    assert check_mapping(DistillConfig, section, "distill") == {
        "is_layers": "off", "gradient_checkpointing": False, "bf16": True}  # bool settings still take YAML 1.1 words


def test_key_value_flags_are_typed_as_the_config_fields():
    from hf_minitron.schema import SettingError, typed_overrides

    assert typed_overrides(DistillConfig, ["learning_rate=6e-4", "is_layers=1:1"], "--set", {"w_clm": 0.25}) == {
        "w_clm": 0.25, "learning_rate": 6e-4, "is_layers": "1:1"}
    with pytest.raises(SettingError, match="unknown key '--set.learning_rat'"):
        typed_overrides(DistillConfig, ["learning_rat=1e-4"], "--set")
