"""The run folder of a build: every artefact name, the member record, and a manifest that makes a build resumable.

Layout (`RUN` = `--out`; the names are the constants below, which every reader and writer imports):

    RUN/manifest.json          every stage: status, inputs (recipe hash, settings, parent hashes), outputs, tokens
    RUN/recipe.yaml            the recipe as resolved (overrides applied)
    RUN/importance/<base>/     cached importance scores of the teacher (`teacher`) or of a parent member
    RUN/<member>/              a finished member: loads with from_pretrained; member.json (`MemberRecord`) says what
                               it is, pruning/search/distill/eval JSON say how it was made
    RUN/<member>-instruct/     its SFT variant, when the recipe asks for one
    RUN/work/<member>/         search candidates and the pruned start point (no member.json: not a member)
    RUN/eval/teacher.json      the teacher's evaluation
    RUN/family/                the family report (results, table, plot, card)

A stage is skipped when its record is `done` with the same settings and parent hashes and its output files are as
it left them, resumed when it is `running` (interrupted) with the same inputs, and redone when an upstream stage was
redone, its output was deleted or changed (truncated weights, a lost eval_results.json), or `--force` names it.
Each output file's size, mtime and sha256 are recorded, so checking them costs a `stat` unless the mtime moved.
A finished stage whose settings changed is never redone silently: that is an error naming the changed keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from . import ranks
from .ranks import RunLockedError, lock_file  # noqa: F401 (RunLockedError: also rundir's API)
from .utils import first_line, read_json, sha256_file

# ---- run folder entries ----
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"  # held by the build working in the folder
RECIPE_FILE = "recipe.yaml"
IMPORTANCE_DIR = "importance"
WORK_DIR = "work"
EVAL_DIR = "eval"
FAMILY_DIR = "family"
TEACHER = "teacher"  # the teacher as a model reference, and its file names (importance/teacher, eval/teacher.json)
PARENT = "parent"  # a member's parent, as a recipe's distillation teacher reference
TEACHER_EVAL = TEACHER + ".json"  # in EVAL_DIR
INSTRUCT_SUFFIX = "-instruct"  # <member>-instruct: the member's SFT variant
TEACHER_LOGITS_DIR = "teacher-logits"  # in WORK_DIR: teacher-logit caches, a folder per (teacher, data, window, K)
PRUNED_DIR = "checkpoint-pruned"  # in WORK_DIR/<member>: the pruned start point of distillation
SEARCH_DIR = "search"  # in WORK_DIR/<member>: the architecture search's candidates
# ---- member folder files ----
CONFIG_FILE = "config.json"
MEMBER_FILE = "member.json"
PRUNING_FILE = "pruning.json"
SEARCH_FILE = "search.json"  # as search.SEARCH_FILE
DISTILL_FILE = "distill_result.json"  # as distill.RESULT_FILE
SFT_FILE = "sft_result.json"  # as sft.RESULT_FILE
CORRECTION_FILE = "correction_result.json"  # as correction.RESULT_FILE, in the corrected teacher's folder
EVAL_FILE = "eval_results.json"  # as evaluate.RESULTS_FILE
CARD_FILE = "README.md"
# ---- family report files (in FAMILY_DIR) ----
FAMILY_RESULTS_FILE = "family_results.json"
FAMILY_TABLE_FILE = "family.md"
FAMILY_PLOT = "family.png"
RECOVERY_PLOT = "recovery.png"  # KD loss against tokens: every member's in the family folder, its own in a member's

# member names that would collide with a run-folder entry or a model reference
RESERVED_NAMES = frozenset({TEACHER, PARENT, IMPORTANCE_DIR, WORK_DIR, EVAL_DIR, FAMILY_DIR, MANIFEST, RECIPE_FILE})
IMPORTANCE_FILE = "importance.json"  # in IMPORTANCE_DIR/<base>, as importance.META_FILE
MODEL_FILES = ("*.safetensors", CONFIG_FILE, IMPORTANCE_FILE, SEARCH_FILE, EVAL_FILE)


class StaleStageError(ValueError):
    pass


@dataclass
class StageOutput:
    """What a stage made: its folder, a hash naming its content, tokens by kind, other fields for its record."""

    path: Path | None
    sha256: str | None
    tokens: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    files: list[Path] | None = None  # the files to check on a rerun; default: the folder's top-level `MODEL_FILES`


_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file hashed for its stage's hash isn't read twice


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def output_files(path: Path | None, files: list[Path] | None = None) -> list[Path]:
    """What a stage made, to check on a rerun: the given files, or the `MODEL_FILES` at the top of its folder."""
    if files is not None:
        return [Path(f) for f in files if Path(f).is_file()]
    if path is None or not path.exists():
        return []
    if path.is_file():
        return [path]
    return sorted({p for pat in MODEL_FILES for p in path.glob(pat) if p.is_file()})


def fingerprint(root: Path, files: list[Path]) -> dict:
    """{path relative to the run folder: size, mtime and sha256} of a stage's output files."""
    out = {}
    for f in files:
        st = f.stat()
        out[os.path.relpath(f, root)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)}
    return out


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_folder(folder: str | Path, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """sha256 over the top-level files of a folder that match `patterns` (names and contents, sorted)."""
    folder = Path(folder)
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"nothing to hash in {str(folder)!r} (expected {', '.join(patterns)})")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


class MemberRecordError(ValueError):
    pass


@dataclass
class MemberRecord:
    """What a member folder is (member.json): which kind, and what it was made from. Cards, the Space and the member
    finder read it; the build writes it once the member's weights are final."""

    name: str
    kind: Literal["base", "instruct"] = "base"
    teacher: str | None = None  # the family's root teacher, as the recipe gave it
    pruned_from: str | None = None  # TEACHER or a member name; None for an instruct variant
    distilled_from: str | None = None  # TEACHER, a member name, or a model spec; None for an instruct variant
    sft_from: str | None = None  # the base member an instruct variant was fine-tuned from
    recipe: str | None = None  # the recipe's name
    shape: dict | None = None  # the pruning target (PruneTarget fields)
    tokens: dict = field(default_factory=dict)  # stage -> tokens, e.g. {"distillation": N} or {"sft": N}
    training: dict = field(default_factory=dict)  # how it was trained: KD losses, state pairs chosen, dtypes

    def __post_init__(self):
        if self.kind not in ("base", "instruct"):
            raise MemberRecordError(f"member {self.name!r}: kind must be 'base' or 'instruct', not {self.kind!r}")

    def write(self, folder: str | Path) -> Path:
        """folder/member.json, replaced atomically so that a reader never sees half a record."""
        path = Path(folder) / MEMBER_FILE
        tmp = path.with_name(MEMBER_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> MemberRecord | None:
        """folder/member.json (this schema or the two older ones), or None when the folder has none."""
        path = Path(folder) / MEMBER_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MemberRecordError(f"{str(path)!r} is not valid JSON: {first_line(e)}") from e
        if not isinstance(data, dict) or not data.get("name"):
            raise MemberRecordError(f"{str(path)!r} is not a member record (no 'name')")
        if "kind" not in data:
            data = _from_old_schema(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise MemberRecordError(f"{str(path)!r} has unknown keys {sorted(unknown)}")
        return cls(**data)


def _from_old_schema(data: dict) -> dict:
    """The member.json of earlier builds: "parent" was the member pruned from (base) or fine-tuned from (instruct)."""
    common = {"name": data["name"], "teacher": data.get("teacher"), "recipe": data.get("recipe")}
    if data.get("instruct"):
        return {**common, "kind": "instruct", "sft_from": data.get("parent")}
    return {**common, "kind": "base", "pruned_from": data.get("parent") or TEACHER,
            "distilled_from": data.get("distilled_from")}


def find_member_folders(path: str | Path) -> list[Path]:
    """A member folder itself, or the member folders (config.json and weights) under a run folder, sorted.

    Folders with a member.json are members; when none has one (folders made by hand or by the single-stage
    commands), every model folder is, except those inside another one (trainer checkpoints) and, in a run folder,
    those in its work and importance folders.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run or member folder {str(path)!r} does not exist")
    if (path / CONFIG_FILE).is_file():
        return [path]
    models = sorted({p.parent for p in path.glob(f"**/{CONFIG_FILE}") if any(p.parent.glob("*.safetensors"))})
    recorded = [f for f in models if MemberRecord.read(f) is not None]
    if recorded:
        return recorded
    skip = [path / WORK_DIR, path / IMPORTANCE_DIR] if (path / MANIFEST).is_file() else []
    return [f for f in models if not any(f != other and f.is_relative_to(other) for other in models)
            and not any(f.is_relative_to(s) for s in skip)]


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@dataclass
class RunDir:
    """A run folder and its manifest; `plan` decides what a stage does, `start`/`finish` record it."""

    root: Path
    manifest: dict
    force: list[str] = field(default_factory=list)  # "stage" (every member) or "member:stage"
    actions: list[tuple[str, str]] = field(default_factory=list)  # (stage key, what this build did)
    lock: object = None  # the open lock file while this build holds the folder
    why: dict[str, str] = field(default_factory=dict)  # stage key -> why `plan` redoes it, for the one-line note

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file releases the flock
            self.lock = None

    # ---- paths ----
    def importance(self, base: str) -> Path:
        return self.root / IMPORTANCE_DIR / base

    def member(self, name: str) -> Path:
        return self.root / name

    def work(self, member: str) -> Path:
        return self.root / WORK_DIR / member

    def teacher_logits(self, name: str) -> Path:
        return self.root / WORK_DIR / TEACHER_LOGITS_DIR / name

    def pruned(self, member: str) -> Path:
        return self.work(member) / PRUNED_DIR

    def search(self, member: str) -> Path:
        return self.work(member) / SEARCH_DIR

    def corrected_teacher(self) -> Path:
        return self.root / WORK_DIR / TEACHER / "corrected"

    def teacher_eval(self) -> Path:
        return self.root / EVAL_DIR / TEACHER_EVAL

    def family(self) -> Path:
        return self.root / FAMILY_DIR

    # ---- manifest ----
    def record(self, key: str) -> dict | None:
        return self.manifest["stages"].get(key)

    def output_hash(self, key: str) -> str | None:
        rec = self.record(key)
        return (rec or {}).get("outputs", {}).get("sha256") if rec and rec.get("status") == "done" else None

    def is_forced(self, key: str) -> bool:
        owner, _, stage = key.rpartition("/")
        return any(f in (stage, f"{owner}:{stage}", key) for f in self.force)

    def plan(self, key: str, settings: dict, parents: dict) -> str:
        """'skip', 'resume', 'run' or 'redo' for a stage with these inputs; an error for changed settings."""
        rec = self.record(key)
        if rec is None:
            return "run"
        if self.is_forced(key):
            return "redo"
        old = rec.get("inputs", {})
        same_settings = old.get("settings") == json.loads(json.dumps(settings, default=str))
        if not same_settings and rec.get("status") == "done":
            keys = changed_keys(old.get("settings", {}), json.loads(json.dumps(settings, default=str)))
            owner, _, stage = key.rpartition("/")
            raise StaleStageError(f"stage {key} finished with other settings ({', '.join(keys[:6])} changed); pass "
                                  f"--force {owner}:{stage} (or --force {stage}) to redo it, or build into a new --out")
        if old.get("parents") != parents:
            return "redo"  # an upstream stage was redone: this one follows
        if rec.get("status") == "done":
            out = rec.get("outputs", {}).get("path")
            changed = f"{out} is missing" if out is not None and not (self.root / out).exists() else \
                self.changed_output(key)
            if changed:
                self.why[key] = changed
                return "redo"
            return "skip"
        return "resume" if same_settings else "redo"

    def changed_output(self, key: str) -> str | None:
        """Why a finished stage's recorded output files are not as it left them, or None. A file whose size and mtime
        match is trusted; a moved mtime costs a hash (and, when the bytes are the same, the new mtime is recorded)."""
        files = self.record(key).get("outputs", {}).get("files") or {}
        touched = False
        for name, was in files.items():
            path = self.root / name
            try:
                st = path.stat()
            except OSError:
                return f"{name} is missing"
            if st.st_size != was["size"]:
                return f"{name} is {st.st_size:,} bytes, was {was['size']:,}"
            if st.st_mtime_ns != was["mtime_ns"]:
                if file_sha256(path) != was["sha256"]:
                    return f"{name} was modified (another sha256)"
                was["mtime_ns"], touched = st.st_mtime_ns, True
        if touched:
            self.save()
        return None

    def start(self, key: str, settings: dict, parents: dict, action: str) -> None:
        self.manifest["stages"][key] = {
            "status": "running", "action": action, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "inputs": {"recipe_sha256": self.manifest.get("recipe_sha256"), "settings": settings, "parents": parents},
        }
        self.actions.append((key, action))
        self.save()

    def finish(self, key: str, path: str | Path | None, sha256: str | None, tokens: dict | None = None,
               files: list[Path] | None = None, **extra) -> None:
        rec = self.manifest["stages"][key]
        started = time.mktime(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%S"))
        rel = None if path is None else os.path.relpath(path, self.root)
        made = fingerprint(self.root, output_files(None if path is None else Path(path), files))
        rec.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - started),
                   outputs={"path": rel, "sha256": sha256, "files": made}, tokens=tokens or {}, **extra)
        self.save()

    def skip(self, key: str) -> None:
        self.actions.append((key, "skipped"))

    def stage(self, key: str, settings: dict, parents: dict, fn, log=print, main_only: bool = False) -> dict:
        """Skip, resume or run one stage; `fn(action)` does the work and returns a `StageOutput`.
        A stage whose `fn` raises stays unfinished, so the next build retries it.

        Under `accelerate launch` the main process decides and records (the others get its decision and then its
        manifest); `fn` runs in every process (it splits its work, and leaves writes to the main one), or in the
        main one alone with `main_only`."""
        action, why = ranks.on_main(lambda: (self.plan(key, settings, parents), self.why.pop(key, None)))
        if action == "skip":
            self.skip(key)
            log(f"[{key}] done earlier: skipped")
            return self.record(key)
        log(f"[{key}] {action}" + (f": {why}" if why else ""))
        self.start(key, settings, parents, action)
        out = ranks.on_main(fn, action) if main_only else fn(action)

        def finish() -> dict:
            self.finish(key, out.path, out.sha256, out.tokens, out.files, **out.record)
            return self.manifest

        self.manifest = ranks.on_main(finish)
        return self.record(key)

    def save(self) -> None:
        """The manifest, replaced atomically; by the main process only (the others keep theirs in memory)."""
        if not ranks.is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, default=str) + "\n")
        os.replace(tmp, self.root / MANIFEST)


def lock_run(root: Path):
    """The run folder's lock (`ranks.lock_file`): one build at a time; under `accelerate launch` its main process
    holds it."""
    return lock_file(root / LOCK_FILE, f"run folder {str(root)!r}")


def open_run(root: str | Path, recipe, teacher: dict, force: list[str] = ()) -> RunDir:
    """Create or reopen a run folder, locked until the returned `RunDir` is closed (use it in a `with`); the
    recipe as resolved is written next to the manifest. Under `accelerate launch` the main process locks and
    writes, and every process gets its manifest."""
    import yaml

    root, held = Path(root), {}

    def create() -> dict:
        root.mkdir(parents=True, exist_ok=True)
        held["lock"] = lock_run(root)
        manifest = read_json(root / MANIFEST) or {"version": 1, "stages": {}}  # a broken manifest: an error naming it
        manifest.update(recipe_sha256=recipe.sha256, recipe=recipe.to_dict(), teacher=teacher)
        manifest.setdefault("builds", [])
        (root / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        RunDir(root, manifest).save()
        return manifest

    return RunDir(root, ranks.on_main(create), list(force), lock=held.get("lock"))
