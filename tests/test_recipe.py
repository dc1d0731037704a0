"""Recipes: every shipped recipe loads, validates and gets each member's parameter count from configs alone."""

from pathlib import Path

import pytest

from hf_minitron.prune import PruneTarget, parameter_count
from hf_minitron.recipe import RecipeError, from_dict, load_recipe, parse_count
from hf_minitron.search import candidates_for

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# published parameter counts (billions) of the paper's members, to 1%
PUBLISHED = {"minitron-8b": 8.27, "minitron-4b": 4.19, "llama-3.1-minitron-4b-width": 4.51,
             "llama-3.1-minitron-4b-depth": 4.54, "mistral-nemo-minitron-8b": 8.41}


def minimal(**extra) -> dict:
    raw = {"name": "t", "teacher": {"source": "some/model"},
           "data": {"calibration": "pydoc-topics", "distillation": "pydoc-topics"}, "distill": {"tokens": "1M"},
           "members": [{"name": "a", "params": "100M"}, {"name": "b", "parent": "a", "shape": {"ffn_size": 512}}]}
    raw.update(extra)
    return raw


def test_shipped_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "minitron-4b-from-minitron-8b.yaml", "minitron-family-15b.yaml",
            "llama-3.1-minitron-4b-width.yaml", "llama-3.1-minitron-4b-depth.yaml"} <= names
    assert any("qwen" in n for n in names) and any("mistral-nemo" in n for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_every_member_has_a_parameter_count(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.members and path.read_text().startswith("#")  # comment header
    if path.stem != "quickstart":
        assert recipe.teacher.config, "paper recipes carry the teacher's shape for offline counts"
    configs = {"teacher": recipe.teacher.model_config()}
    from hf_minitron.prune import student_config

    for m in recipe.members:
        base = configs[m.parent or "teacher"]
        if m.shape:
            target = m.shape
            count = parameter_count(base, target)
            configs[m.name] = student_config(base, target)
        else:  # a budget: the search must find shapes within tolerance, each counted exactly
            search = m.search_settings(recipe.search)
            found = candidates_for(base, m.params, search)
            assert all(abs(c.params / m.params - 1) <= search.tolerance for c in found)
            assert all(c.params == parameter_count(base, c.target()) for c in found)  # fast count == exact
            count = found[0].params
            configs[m.name] = student_config(base, found[0].target())
        assert 0 < count < parameter_count(base, PruneTarget())
        if m.name in PUBLISHED:
            assert count / 1e9 == pytest.approx(PUBLISHED[m.name], rel=0.01)


def test_overrides_by_index_and_name():
    r = from_dict(minimal(), ["distill.tokens=2M", "members.a.params=90M", "members.1.instruct=true",
                              "data.sft=alpaca.jsonl", "search.tolerance=0.1", "teacher.source=other/model"])
    assert r.distill["tokens"] == 2_000_000 and r.members[0].params == 90_000_000 and r.members[1].instruct
    assert r.data.sft.path == "alpaca.jsonl" and r.search.tolerance == 0.1 and r.teacher.source == "other/model"
    assert r.sha256 != from_dict(minimal()).sha256


@pytest.mark.parametrize("override, message", [
    ("distill.tokenz=5", "unknown key 'distill.tokenz'"),
    ("members.0.params=lots", "members.0.params: expected an integer"),
    ("members.1.parent=zz", "members.1.parent: 'zz' is not an earlier member"),
    ("members.0.shape={ffn_size: 64}", "members.0: give either shape or params"),
    ("search.depth=maybe", "search.depth: expected true or false"),
    ("prune.depth_metric=random", "prune.depth_metric: 'random' is not one of"),
    ("importance.depth_metric=bi", "importance.depth_metric is now prune.depth_metric"),
    ("distill.lr=1e-4", "distill.lr is now distill.learning_rate"),
    ("distill.learning_rate=fast", "distill.learning_rate: expected a number"),
    ("distill.logit_loss=kl2", "distill.logit_loss: 'kl2' is not one of"),
    ("distill.is_layers=3-1", "distill: bad is_layers entry '3-1'"),
    ("distill.output_dir=x", "unknown key 'distill.output_dir'"),
    ("sft.lora_r=big", "sft.lora_r: expected an integer"),
    ("evaluate.tasks=[mmlu:x]", "evaluate.tasks: bad few-shot count"),
    ("members.0.name=teacher", "members.0.name: 'teacher' is reserved"),
    ("members.0.name=work", "members.0.name: 'work' is reserved"),
    ("members.c.params=1", "no entry named 'c'"),
    ("teacher.source=", "teacher.source: missing"),
    ("members.1.instruct=true", "data.sft: missing"),
    ("members.1.shape.hidden=3", "unknown key 'members.1.shape.hidden'"),
    ("members.0.search={min_widht: 0.2}", "unknown key 'members.0.search.min_widht'"),
    ("members.0.search={tolerance: 2}", "members.0.search.tolerance: must be in"),
    ("members.1.distill={unlikelyhood: 1}", "unknown key 'members.1.distill.unlikelyhood'"),
    ("members.1.distill={unlikelihood: 2}", "members.1.distill: unlikelihood must be a fraction in [0, 1], got 2"),
    ("members.1.distill={max_length: 64}", "members.1.distill.max_length: shared by the whole family"),
    ("members.1.distill={tokens: 5M}", "members.1.distill_tokens for the budget"),
])
def test_bad_recipes_fail_naming_the_dotted_key(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_dict(minimal(), [override])


def test_a_members_distill_overrides_are_its_own():
    recipe = from_dict(minimal(), ["members.1.distill={unlikelihood: 0.5, learning_rate: 3e-4}"])
    a, b = recipe.members
    assert recipe.distill_setting("unlikelihood", b) == 0.5 and recipe.distill_settings(b)["learning_rate"] == 3e-4
    assert recipe.distill_setting("unlikelihood", a) == 0.0 and "learning_rate" not in recipe.distill_settings(a)
    assert recipe.distill_settings(b)["tokens"] == 1_000_000  # the family's budget, unless distill_tokens says


def test_counts_and_missing_file():
    assert parse_count("100M") == 100_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("2e12") == parse_count("2T") == 2 * 10**12 and parse_count(512) == 512
    with pytest.raises(RecipeError, match="x: expected an integer"):
        parse_count("1.5", "x")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


@pytest.mark.parametrize("tasks", ["[paper]", "['mmlu:5']", "[code, hellaswag]"])
def test_task_presets_and_shots_are_accepted(tasks):
    assert from_dict(minimal(), [f"evaluate.tasks={tasks}"]).evaluate.tasks


@pytest.mark.parametrize("name", ["teacher", "family", "importance", "work", "eval", "parent"])
def test_reserved_member_names_are_refused(name):
    with pytest.raises(RecipeError, match=f"'{name}' is reserved"):
        from_dict(minimal(), [f"members.0.name={name}", f"members.1.parent={name}"])


def test_gpu_settings_load_on_a_cpu_machine():
    assert from_dict(minimal(), ["distill.bf16=true"]).distill["bf16"] is True
