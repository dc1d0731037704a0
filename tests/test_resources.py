"""The card templates and the Space app reach a non-editable install: build the wheel, install it into a bare
virtual environment, render a card and find the app from there."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from hf_minitron.resources import shipped

REPO = Path(__file__).resolve().parents[1]


def test_source_tree_is_found_first():
    assert shipped("model_cards", "member.md.j2") == REPO / "model_cards"
    assert shipped("spaces/compare", "app.py") == REPO / "spaces" / "compare"


def test_missing_resource_names_the_folders():
    with pytest.raises(FileNotFoundError, match="nothing_here/ is missing"):
        shipped("nothing_here", "x")


def test_wheel_install_renders_cards_and_finds_the_app(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "hf_minitron", "model_cards", "spaces"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                         else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True)
    (wheel,) = (tmp_path / "dist").glob("hf_minitron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("model_cards/member.md.j2", "model_cards/family.md.j2", "spaces/compare/app.py",
              "spaces/compare/requirements.txt", "spaces/compare/README.md"):
        assert any(n.endswith(".data/data/share/hf-minitron/" + f) for n in names), f

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    # the bare environment borrows this one's dependencies (a path line, appended after its own site-packages)
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    (target / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (tmp_path / "member").mkdir()
    (tmp_path / "member" / "config.json").write_text(
        '{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,'
        ' "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100}')
    script = (
        "import hf_minitron, sys\n"
        "from hf_minitron.cards import write_member_card\n"
        "from hf_minitron.space import app_dir\n"
        f"assert {str(REPO)!r} not in hf_minitron.__file__, hf_minitron.__file__\n"
        f"card = write_member_card({str(tmp_path / 'member')!r}).read_text()\n"
        "assert 'hf-minitron' in card and 'LlamaForCausalLM' in card\n"
        "print(app_dir())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == env_dir / "share" / "hf-minitron" / "spaces" / "compare"
