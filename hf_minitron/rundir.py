"""The run folder of a build: fixed artefact paths and a manifest that makes a build resumable.

Layout (`RUN` = `--out`):

    RUN/manifest.json          every stage: status, inputs (recipe hash, settings, parent hashes), outputs, tokens
    RUN/recipe.yaml            the recipe as resolved (overrides applied)
    RUN/importance/<base>/     cached importance scores of the teacher (`teacher`) or of a parent member
    RUN/<member>/              a finished member: loads with from_pretrained; pruning/search/distill/eval JSON
    RUN/<member>-instruct/     its SFT variant, when the recipe asks for one
    RUN/work/<member>/         search candidates and the pruned start point (`checkpoint-pruned`, so that
                               `publish` and `space`, which skip checkpoint-* folders, never take it for a member)

A stage is skipped when its record is `done` with the same settings and parent hashes, resumed when it is
`running` (interrupted) with the same inputs, and redone when an upstream stage was redone or `--force` names it.
A finished stage whose settings changed is never redone silently: that is an error naming the changed keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
MODEL_FILES = ("*.safetensors", "config.json", "importance.json", "search.json", "eval_results.json")


class StaleStageError(ValueError):
    pass


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: str | Path, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """sha256 over the top-level files of a folder that match `patterns` (names and contents, sorted)."""
    folder = Path(folder)
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"nothing to hash in {str(folder)!r} (expected {', '.join(patterns)})")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + hash_file(p).encode() + b"\n")
    return h.hexdigest()


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

    # ---- paths ----
    def importance(self, base: str) -> Path:
        return self.root / "importance" / base

    def member(self, name: str) -> Path:
        return self.root / name

    def work(self, member: str) -> Path:
        return self.root / "work" / member

    def pruned(self, member: str) -> Path:
        return self.work(member) / "checkpoint-pruned"

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
            return "skip" if out is None or (self.root / out).exists() else "redo"
        return "resume" if same_settings else "redo"

    def start(self, key: str, settings: dict, parents: dict, action: str) -> None:
        self.manifest["stages"][key] = {
            "status": "running", "action": action, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "inputs": {"recipe_sha256": self.manifest.get("recipe_sha256"), "settings": settings, "parents": parents},
        }
        self.actions.append((key, action))
        self.save()

    def finish(self, key: str, path: str | Path | None, sha256: str | None, tokens: dict | None = None,
               **extra) -> None:
        rec = self.manifest["stages"][key]
        started = time.mktime(time.strptime(rec["started"], "%Y-%m-%dT%H:%M:%S"))
        rel = None if path is None else os.path.relpath(path, self.root)
        rec.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - started),
                   outputs={"path": rel, "sha256": sha256}, tokens=tokens or {}, **extra)
        self.save()

    def skip(self, key: str) -> None:
        self.actions.append((key, "skipped"))

    def stage(self, key: str, settings: dict, parents: dict, fn, log=print) -> dict:
        """Skip, resume or run one stage; `fn(action)` does the work and returns (output path, sha256, tokens,
        extra fields for the record). A stage whose `fn` raises stays unfinished, so the next build retries it."""
        action = self.plan(key, settings, parents)
        if action == "skip":
            self.skip(key)
            log(f"[{key}] done earlier: skipped")
            return self.record(key)
        log(f"[{key}] {action}")
        self.start(key, settings, parents, action)
        path, sha, tokens, extra = fn(action)
        self.finish(key, path, sha, tokens, **extra)
        return self.record(key)

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, default=str) + "\n")
        os.replace(tmp, self.root / MANIFEST)


def open_run(root: str | Path, recipe, teacher: dict, force: list[str] = ()) -> RunDir:
    """Create or reopen a run folder; the recipe as resolved is written next to the manifest."""
    import yaml

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"version": 1, "stages": {}}
    manifest.update(recipe_sha256=recipe.sha256, recipe=recipe.to_dict(), teacher=teacher)
    manifest.setdefault("builds", [])
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    run = RunDir(root, manifest, list(force))
    run.save()
    return run
