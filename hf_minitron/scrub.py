"""What goes to the Hub holds no path of this machine: absolute paths in the text files we write are rewritten.

A build's metadata records where things were (the teacher's file, the data, the run folder's checkpoints); published,
those would show the user's folder layout and name. `scrub_paths` rewrites each absolute path: inside the run folder
relative to it (`work/small/checkpoint-pruned`), inside the teacher's local copy the teacher's Hub id when known, and
anywhere else the bare file name (`wikitext2_test.txt`). Only our own text files are rewritten (`SCRUBBED`); weights
and tokenizer files go up as they are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .rundir import CARD_FILE, DISTILL_FILE, EVAL_FILE, FAMILY_RESULTS_FILE, PRUNING_FILE, SEARCH_FILE, SFT_FILE
from .utils import read_json

# the text files we write, uploaded with local paths rewritten (`scrub_paths`); weights and tokenizers go as they are
SCRUBBED = (CARD_FILE, EVAL_FILE, PRUNING_FILE, SEARCH_FILE, DISTILL_FILE, SFT_FILE, FAMILY_RESULTS_FILE, "family.json")
_PART = r"[^\s/\"'`()\[\]{}<>,;|*?\\]+"
# an absolute path of two or more parts (or ~/...), not inside a URL or a relative path
_ABS_PATH = re.compile(rf"(?<![\w.:/~@-])(?:~/|/){_PART}(?:/{_PART})+/?|(?<![\w.:/~@-])~/{_PART}")


def scrub_paths(text: str, root: str | Path | None = None, aliases: dict[str, str] | None = None) -> str:
    """`text` with every absolute local path rewritten: inside `root` (the run folder) relative to it, inside a key
    of `aliases` (the teacher's local copy) its value (the teacher's Hub id), elsewhere the bare file name; the run
    folder given relative (`runs/x/...`) is made relative to itself too."""
    roots = {os.path.normpath(os.path.abspath(root)), os.path.realpath(root)} if root else set()
    aliases = {os.path.normpath(os.path.abspath(os.path.expanduser(k))): v for k, v in (aliases or {}).items()}

    def rewrite(match: re.Match) -> str:
        path = os.path.normpath(os.path.expanduser(match.group(0)))
        for local, repo_id in aliases.items():
            if path == local or path.startswith(local + os.sep):
                return repo_id if path == local else f"{repo_id}/{os.path.relpath(path, local)}"
        for base in roots:
            if path == base or path.startswith(base + os.sep):
                return os.path.relpath(path, base)
        return os.path.basename(path)

    text = _ABS_PATH.sub(rewrite, text)
    if root and not Path(root).is_absolute():
        given = re.escape(os.path.normpath(str(root)))
        text = re.sub(rf"(?<![\w./~@-]){given}/", "", re.sub(rf"(?<![\w./~@-]){given}(?![\w./-])", ".", text))
    return text


def publishable(files: dict[str, Path], root: str | Path | None = None,
                aliases: dict[str, str] | None = None) -> dict[str, Path | bytes]:
    """What goes up for each file: the file itself, or for the text files we write (SCRUBBED) their bytes with the
    local paths rewritten."""
    return {name: scrub_paths(path.read_text(), root, aliases).encode() if name in SCRUBBED else path
            for name, path in files.items()}


def teacher_aliases(folder: Path, card_fields: dict) -> dict[str, str]:
    """{the teacher's local path: its Hub id} when the teacher was a local file or folder (the card's `teacher`, the
    member's pruning.json) and its Hub id is known (the card's `base_model`)."""
    from .cards import is_repo_id

    repo_id = card_fields.get("base_model")
    recorded = ((read_json(folder / PRUNING_FILE) or {}).get("teacher") or {}).get("source")
    local = [s for s in (card_fields.get("teacher"), recorded) if isinstance(s, str) and s.startswith(("/", "~"))]
    return {s: repo_id for s in local} if is_repo_id(repo_id) else {}
