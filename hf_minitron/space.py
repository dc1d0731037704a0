"""The comparison Space, locally: a family file from a run folder (or member folders / Hub ids), then the Gradio app.

The app itself is `spaces/compare/app.py`, self-contained so that it also runs as a Hugging Face Space; this module
loads that file, builds the family it is given, and launches it. `write_space_folder` lays out a Space repo (app,
requirements, README, family file with Hub ids, plot) for publishing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from .cards import is_repo_id
from .resources import shipped
from .rundir import (CONFIG_FILE, EVAL_FILE, FAMILY_PLOT, FAMILY_RESULTS_FILE, MANIFEST, PRUNING_FILE, SFT_FILE,
                     TEACHER, MemberRecord, RunDir, find_member_folders)
from .utils import read_json

SPACE_FILES = ("app.py", "requirements.txt", "README.md")
FAMILY_SUFFIXES = (".json", ".yaml", ".yml")
FAMILY_FILE = "family.json"  # the Space's family file, the first the app looks for


class SpaceError(ValueError):
    pass


def app_dir() -> Path:
    """spaces/compare/: in the repository, or where a wheel installed it."""
    return shipped("spaces/compare", "app.py")


def load_app(space_dir: str | Path | None = None):
    """The app module (`spaces/compare/app.py`), imported from its file."""
    path = Path(space_dir or app_dir()) / "app.py"
    if not path.is_file():
        raise SpaceError(f"the Space app {str(path)!r} is missing")
    name = "hf_minitron_space_app"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _count_parameters(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, from their headers alone (no weights read)."""
    import struct

    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, tensor in header.items():
            if key != "__metadata__":
                n = 1
                for d in tensor["shape"]:
                    n *= d
                total += n
    return total or None


def member_entry(spec: str | Path) -> dict:
    """One family-file member from a local member folder (reading its metadata) or a Hub id (taken as it is)."""
    path = Path(spec)
    if not path.is_dir():
        if str(spec).count("/") != 1 or str(spec).startswith((".", "/")):
            raise SpaceError(f"{str(spec)!r} is neither a member folder nor a Hub id (owner/name)")
        return {"name": str(spec).split("/")[-1], "model": str(spec), "instruct": "instruct" in str(spec).lower()}
    if not (path / CONFIG_FILE).is_file():
        raise SpaceError(f"{str(path)!r} is not a member folder (no {CONFIG_FILE})")
    entry = {"name": path.name, "model": str(path.resolve())}
    # instruct: its member.json says so; without one, it went through SFT (sft_result.json) or is named so
    record = MemberRecord.read(path)
    entry["instruct"] = (record.kind == "instruct" if record else
                         (path / SFT_FILE).is_file() or "instruct" in path.name.lower())
    results = read_json(path / EVAL_FILE)
    pruning = read_json(path / PRUNING_FILE) or {}
    params = (results or {}).get("parameters") or pruning.get("student_parameters") or _count_parameters(path)
    if params:
        entry["params"] = int(params)
    if results:
        entry["eval"] = results
    return entry


def teacher_entry(spec: str, results: dict | None = None) -> dict | None:
    """The teacher as a family-file member (the Space's first column, the reference): a local folder, a .gguf file,
    a `pkg:` file (resolved to where it lies) or a Hub id; None for a spec the Space cannot load. It gets the
    prompt as it is, as the base members do."""
    path = Path(spec).expanduser()
    if spec.startswith("pkg:"):
        from .models import ModelLoadError, resolve_source

        try:
            src = resolve_source(spec)
        except ModelLoadError:  # the package is not installed here: no column, the name stays in the intro
            return None
        where = {"model": src.path, "gguf_file": src.gguf_file}
    elif path.is_file() and path.suffix == ".gguf":
        where = {"model": str(path.resolve().parent), "gguf_file": path.name}
    elif path.is_dir():
        where = {"model": str(path.resolve())}
    elif is_repo_id(spec):
        where = {"model": spec}
    else:
        return None
    entry = {"name": TEACHER, "source": spec, **{k: v for k, v in where.items() if v}}
    if results:
        entry["eval"] = results
        if results.get("parameters"):
            entry["params"] = int(results["parameters"])
    return entry


def family_from_run(run: str | Path, name: str | None = None) -> dict:
    """A family (as the family file's dict) from a run folder: its member folders, each member's eval_results.json,
    and the family report (family_results.json, family.png) wherever it lies in the run."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    folders = find_member_folders(run)
    if not folders:
        raise SpaceError(f"no member folders (config.json + .safetensors) under {str(run)!r}")
    members = [member_entry(f) for f in folders]
    seen: dict[str, int] = {}
    for m in members:  # folders with the same name in different places: name them by their path
        seen[m["name"]] = seen.get(m["name"], 0) + 1
    for m, folder in zip(members, folders, strict=True):
        if seen[m["name"]] > 1:
            m["name"] = "/".join(folder.relative_to(run).parts) or run.name
    members.sort(key=lambda m: -(m.get("params") or 0))
    family: dict = {"name": name or run.resolve().name, "members": members}
    teacher = (read_json(run / MANIFEST) or {}).get("teacher")
    if isinstance(teacher, dict):
        teacher = teacher.get("source")
    if teacher:  # a column of its own when the Space can load it, else its name in the intro
        family["teacher"] = teacher_entry(str(teacher), read_json(RunDir(run, {}).teacher_eval())) or str(teacher)
    report = sorted(run.glob(f"**/{FAMILY_RESULTS_FILE}"), key=lambda p: len(p.parts))
    if report:
        family["results"] = str(report[0].resolve())
    plots = sorted(run.glob(f"**/{FAMILY_PLOT}"), key=lambda p: len(p.parts)) or sorted(run.glob("*.png"))
    if plots:
        family["plot"] = str(plots[0].resolve())
    return family


def build_family(source, name: str | None = None) -> dict:
    """The family dict for a family file, a run folder, a member folder, or a list of member folders / Hub ids."""
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return build_family(source[0], name)
        return {"name": name or "hf-minitron family", "members": [member_entry(s) for s in source]}
    path = Path(source)
    if path.is_file():
        if path.suffix not in FAMILY_SUFFIXES:
            raise SpaceError(f"{str(path)!r} is not a family file ({', '.join(FAMILY_SUFFIXES)})")
        app = load_app()
        data = app.read_structured(path)
        app.family_from_dict(data, base=path.resolve().parent)  # validate now, with the file named in the error
        base = path.resolve().parent
        data = dict(data)
        for key in ("results", "plot"):  # relative to the file: make them absolute for a family written elsewhere
            if isinstance(data.get(key), str) and (base / data[key]).exists():
                data[key] = str((base / data[key]).resolve())
        members = [{"model": m} if isinstance(m, str) else dict(m) for m in data["members"]]
        for m in members:
            if m.get("model") and (base / str(m["model"])).exists():
                m["model"] = str((base / str(m["model"])).resolve())
        data["members"] = members
        if name:
            data["name"] = name
        return data
    if path.is_dir():
        return family_from_run(path, name)
    return {"name": name or str(source), "members": [member_entry(source)]}


def write_family_file(family: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(family, indent=1) + "\n")
    return path


def make_app(source, name: str | None = None, device: str | None = None, **limits):
    """The Gradio Blocks for a family source (see `build_family`), not launched; `limits`: `max_prompt_tokens`,
    `concurrency_limit` (defaults: the app's, from its environment variables)."""
    if importlib.util.find_spec("gradio") is None:
        raise SpaceError("the comparison app needs Gradio: pip install 'gradio>=6,<7'")
    app = load_app()
    family = app.family_from_dict(build_family(source, name))
    return app.build_app(family, app.ModelCache(device), **limits)


def launch_space(source, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
                 name: str | None = None, device: str | None = None, block: bool = True,
                 max_prompt_tokens: int | None = None, concurrency_limit: int | None = None, **launch_kwargs):
    """Launch the comparison app on a family file, run folder, member folder, or list of member folders / Hub ids.

    Prompts keep at most `max_prompt_tokens` tokens and `concurrency_limit` generations run at a time (defaults: the
    app's MAX_PROMPT_TOKENS and CONCURRENCY_LIMIT environment variables, else 1024 and 1). `block=False` returns at
    once with the server running in the background (`demo.close()` stops it); returns the Gradio Blocks.
    """
    app = load_app()
    demo = make_app(source, name=name, device=device, max_prompt_tokens=max_prompt_tokens,
                    concurrency_limit=concurrency_limit)
    app.launch(demo, server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
               **launch_kwargs)
    return demo


def write_space_folder(source, out: str | Path, repo_ids: dict[str, str] | None = None,
                       name: str | None = None) -> Path:
    """A Space repo folder: app.py, requirements.txt, README.md, family.json (and family.png, family_results.json).

    `repo_ids` maps member names to the Hub ids they were published under; every local member needs one, since a
    Space cannot read this machine's folders.
    """
    family = build_family(source, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in SPACE_FILES:
        shutil.copy2(app_dir() / f, out / f)
    repo_ids = repo_ids or {}
    missing = []
    for m in family["members"]:
        if isinstance(m, dict) and m.get("name") in repo_ids:
            m["model"] = repo_ids[m["name"]]
        elif isinstance(m, dict) and Path(m["model"]).is_absolute():
            missing.append(m.get("name"))
    if missing:
        raise SpaceError(f"members {missing} are local folders: give their Hub ids (repo_ids) for a Space")
    teacher = family.get("teacher")
    if isinstance(teacher, dict) and Path(teacher["model"]).is_absolute():  # the Space cannot load it: its name only
        family["teacher"] = teacher.get("source") or teacher["name"]
    for key, target in (("results", FAMILY_RESULTS_FILE), ("plot", FAMILY_PLOT)):
        if isinstance(family.get(key), str):  # a file: copied next to the app (inline results stay inline)
            if Path(family[key]).is_file():
                shutil.copy2(family[key], out / target)
                family[key] = target
            else:
                family.pop(key)
    write_family_file(family, out / FAMILY_FILE)
    return out
