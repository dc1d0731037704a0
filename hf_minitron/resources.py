"""Files that ship beside the package: the model card templates (`model_cards/`) and the comparison Space
(`spaces/compare/`).

They live at the repository's top level (the project's layout), not inside the package. A source checkout or an
editable install reads them there; a wheel installs them under `<prefix>/share/hf-minitron/` (pyproject's
`[tool.setuptools.data-files]`), for a virtual environment, a system or a `--user` install alike.
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

SHARE = Path("share") / "hf-minitron"


def _roots() -> list[Path]:
    roots = [Path(__file__).resolve().parents[1]]  # the repository (source checkout, editable install)
    roots += [Path(p) / SHARE for p in (sys.prefix, sysconfig.get_path("data"), site.getuserbase())]
    return roots


def shipped(relative: str, must_have: str) -> Path:
    """The folder `relative` (e.g. 'model_cards') holding the file `must_have`, wherever the install put it."""
    for root in _roots():
        folder = root / relative
        if (folder / must_have).is_file():
            return folder
    where = ", ".join(str(r / relative) for r in _roots())
    raise FileNotFoundError(f"hf-minitron's {relative}/ is missing (looked in {where}); reinstall the package")
