"""The build's stages, one function each: what a stage of `pipeline.build` reads, runs and records.

Each wraps the entry function its CLI command calls (`correct_teacher`, `run_importance`, `write_teacher_cache`,
`run_search`, `run_prune`, `distill`, `sft`, `evaluate_model`) in `Build.stage` (`RunDir.stage` plus progress
lines): its settings and parents decide whether a rerun skips, resumes or redoes it; its `StageOutput` names what
it made, the tokens it read and the FLOPs it spent.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import ranks
from .cost import train_flops
from .recipe import MemberSection, Recipe
from .rundir import (INSTRUCT_SUFFIX, PRUNING_FILE, SEARCH_DIR, SEARCH_FILE, TEACHER, MemberRecord, RunDir,
                     StageOutput, hash_folder, hash_json)

WEIGHTS = ("*.safetensors", "config.json")  # what names a trained model's output
CORRECTION_STAGE = f"{TEACHER}/correction"


@dataclass
class Build:
    """What the stages share: the recipe, the run folder, the teacher and cached models, tokenizer and documents."""

    recipe: Recipe
    run: RunDir
    source: object  # ModelSource of the teacher
    teacher_config: object  # its config, read once (a GGUF's takes seconds)
    progress: bool = True
    log: object = print
    models: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    started: float = field(default_factory=time.time)

    def stage(self, key: str, settings: dict, parents: dict, fn, log=None, main_only: bool = False) -> dict:
        """`RunDir.stage` with a progress line as the stage starts and as it ends (elapsed, tokens/s), each with
        the build's clock; `main_only`: `fn` runs in the main process alone, the others waiting."""
        def timed(action):
            t0 = time.time()
            out = fn(action)
            seconds, tokens = time.time() - t0, sum(((out and out.tokens) or {}).values())
            rate = f", {tokens:,} tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s" if tokens else ""
            self.log(f"{clock(self.started)} [{key}] done in {clock(t0)}{rate}")
            return out

        return self.run.stage(key, settings, parents, timed,
                              log=lambda line: self.log(f"{clock(self.started)} {line}"), main_only=main_only)

    def tokenizer(self):
        if "tokenizer" not in self.cache:
            from .models import load_tokenizer

            self.cache["tokenizer"] = load_tokenizer(self.source, self.recipe.teacher.trust_remote_code)
        return self.cache["tokenizer"]

    def is_member(self, ref: str) -> bool:
        return any(m.name == ref for m in self.recipe.members)

    def model(self, ref: str):
        """The teacher, a member (its distilled folder) or another model spec, loaded once."""
        if ref not in self.models:
            from .models import load_model

            t = self.recipe.teacher
            if ref == TEACHER:
                self.log(f"loading teacher {t.source}")
                corrected = self.recipe.teacher_correction.get("tokens")
                self.models[ref] = load_model(str(correction_stage(self)) if corrected else self.source, dtype=t.dtype,
                                              device=t.device, trust_remote_code=t.trust_remote_code)
            else:
                path = self.run.member(ref) if self.is_member(ref) else ref
                self.models[ref] = load_model(str(path), dtype=t.dtype, device=t.device)
        return self.models[ref]

    def source_of(self, ref: str):
        """The `ModelSource` of the teacher (the corrected one when the recipe corrects it), a member (its distilled
        folder) or another model spec: what the layer-by-layer and streaming paths read."""
        from .models import resolve_source

        if ref == TEACHER:
            return resolve_source(str(correction_stage(self))) if self.recipe.teacher_correction.get("tokens") \
                else self.source
        return resolve_source(str(self.run.member(ref)) if self.is_member(ref) else ref)

    def identity(self, ref: str) -> str:
        """A hash naming a model's exact weights: the teacher's source, a member's distilled output, a spec."""
        if ref == TEACHER:
            if self.recipe.teacher_correction.get("tokens"):
                correction_stage(self)  # runs, or is found done without loading anything, before its output names it
                return self.run.output_hash(CORRECTION_STAGE)
            return hash_json({**self.source.as_dict(), "dtype": self.recipe.teacher.dtype})
        if self.is_member(ref):
            return self.run.output_hash(f"{ref}/distill") or "unbuilt"
        return hash_json({"spec": ref})

    def params_of(self, ref: str) -> int:
        from .archs import count_parameters
        from .models import load_config

        if ref == TEACHER:
            return count_parameters(self.teacher_config)
        return count_parameters(load_config(str(self.run.member(ref)) if self.is_member(ref) else ref))

    def train_documents(self):
        """The distillation source, minus its held-out tail when evaluation reads the same source."""
        if "train" not in self.cache:
            from .data import load_text_dataset, split_holdout

            ds = load_text_dataset(self.recipe.data.distillation)
            holdout = self.recipe.data.eval_holdout
            self.cache["train"] = split_holdout(ds, holdout)[0] if holdout else ds
        return self.cache["train"]


def clock(since: float) -> str:
    """Elapsed time since `since` as h:mm:ss."""
    s = round(time.time() - since)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def correction_stage(b: Build) -> Path:
    """Teacher correction (arXiv 2408.11796): the teacher fine-tuned on the distillation text, before importance."""
    from .correction import CorrectionConfig, correct_teacher
    from .models import load_model

    r, out, t = b.recipe, b.run.corrected_teacher(), b.recipe.teacher
    if "corrected" in b.cache:  # once per build: the teacher's identity and loading both ask for it
        return out
    settings = {**r.teacher_correction, "data": asdict(r.data.distillation), "holdout": r.data.holdout}
    settings.pop("keep_checkpoints", None)
    config = CorrectionConfig(**r.teacher_correction, disable_tqdm=not b.progress)
    b.stage(CORRECTION_STAGE, settings, {"teacher": hash_json({**b.source.as_dict(), "dtype": t.dtype})},
                lambda action: correct_teacher(load_model(b.source, t.dtype, t.device, t.trust_remote_code),
                                               b.tokenizer(), b.train_documents(), out, config, action != "redo",
                                               b.progress, text_column=r.data.distillation.text_column), log=b.log)
    b.cache["corrected"] = True
    return out


def importance_stage(b: Build, base: str) -> Path:
    from .importance import run_importance

    from .layerwise import use_layers

    r, folder, t = b.recipe, b.run.importance(base), b.recipe.teacher
    config = needed_passes(r, [m for m in r.members if m.base == base])
    # how the scores are computed is not what they are: a finished stage stays finished when the mode changes
    settings = {**_without(asdict(config), "mode", "activation_memory"), "data": asdict(r.data.calibration)}

    def fn(action) -> StageOutput:
        # gone before any process looks: run_importance's main process replaces it while the others return
        ranks.on_main(shutil.rmtree, folder, ignore_errors=True)
        src = None if base in b.models else b.source_of(base)  # a model already loaded is scored as it is
        model = src if src is not None and use_layers(config.mode, src) else b.model(base)
        return run_importance(model, b.tokenizer(), r.data.calibration, config, folder, {"base": base},
                              progress=b.progress, dtype=t.dtype, device=t.device)

    b.stage(f"importance/{base}", settings, {"model": b.identity(base)}, fn, log=b.log)
    return folder


def needed_passes(r: Recipe, members: list[MemberSection]):
    """The importance settings less the passes no member reads: the perplexity-drop pass (a forward per layer) only
    when a member drops layers by a perplexity metric, the head ablation (a forward per head) only when one prunes
    heads by it."""
    depth = any(m.search_settings(r.search).depth if m.params else m.shape.num_layers for m in members)
    heads = any(m.params or m.shape.num_heads or m.shape.num_kv_heads for m in members)
    imp = r.importance
    ppl = imp.depth_ppl_samples if depth and r.prune.depth_metric.startswith("ppl") else 0
    ablation = imp.head_ablation_samples if heads and r.prune.head_score == "ablation" else 0
    return replace(imp, depth_ppl_samples=ppl, head_ablation_samples=ablation)


def cache_need(r: Recipe, m: MemberSection) -> dict:
    """The member's teacher-logit cache settings (`mode`: None, 'auto' or a folder; `top_k`, `temperature`,
    `seq_len`), the `tokens` it holds (every token of its distillation's whole steps, and of its search's when the
    search trains on the same window: `shared`). From the recipe alone: no trainer arguments are built (those check
    the hardware)."""
    from .search import eval_steps

    get = r.distill_setting
    mode = get("teacher_cache")
    window = get("max_length")
    # tokens per optimizer step over every process of the launch, as distill.py counts them
    per_step = get("global_batch_tokens") or \
        get("per_device_train_batch_size") * get("gradient_accumulation_steps") * window * ranks.world()
    need = -(-r.distill_tokens(m) // per_step) * per_step
    search = m.search_settings(r.search)
    shared = bool(m.params) and search.seq_len == window
    stops, search_step = eval_steps(search)
    shared = shared and bool(stops)  # a search that does not retrain reads no teacher
    if shared:
        need = max(need, stops[-1] * search_step)
    return {"mode": None if mode in (None, "", "off", "none") else mode, "top_k": get("teacher_cache_top_k"),
            "top_p": get("teacher_cache_top_p"), "temperature": get("temperature"), "seq_len": window,
            "tokens": need, "shared": shared, "batch_size": get("per_device_train_batch_size")}


def teacher_logits_stage(b: Build, m: MemberSection) -> tuple[Path | None, bool]:
    """(the member's teacher-logit cache or None, whether its search reads it too).

    `distill.teacher_cache: auto`: the member's KD teacher runs once over the windows its search candidates (when
    their window is the distillation's) and its distillation read, as the stage `<member>/teacher-logits`, into a
    folder named by what it was computed from: a rerun, or another member asking the same, finds it done and
    counts its FLOPs once. A folder path in the recipe is used as it is (the distillation only).
    """
    from .teacher_cache import META_FILE, TeacherCacheConfig, write_teacher_cache

    r = b.recipe
    plan = cache_need(r, m)
    if plan["mode"] != "auto":
        return (Path(plan["mode"]) if plan["mode"] else None), False
    settings = {k: plan[k] for k in ("top_k", "seq_len", "temperature", "tokens")}
    if plan["top_p"] is not None:  # only when set: caches written before top_p existed keep their folder
        settings["top_p"] = plan["top_p"]
    settings.update(data=asdict(r.data.distillation), holdout=r.data.holdout)
    parents = {"kd_teacher": b.identity(m.kd_teacher)}
    folder = b.run.teacher_logits(hash_json({**settings, **parents})[:16])

    def fn(action) -> StageOutput:
        def existing() -> dict:
            if action == "redo":
                shutil.rmtree(folder, ignore_errors=True)
            return json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}

        meta = ranks.on_main(existing)  # every process takes the main one's view
        reused = bool(meta.get("complete"))
        if not reused:
            cache_config = TeacherCacheConfig(max_tokens=plan["tokens"], seq_len=plan["seq_len"],
                                              top_k=plan["top_k"], top_p=plan["top_p"],
                                              temperature=plan["temperature"], batch_size=plan["batch_size"])
            meta = write_teacher_cache(b.model(m.kd_teacher), b.tokenizer(), b.train_documents(), str(folder),
                                       cache_config, text_column=r.data.distillation.text_column,
                                       identity={"source": m.kd_teacher, "weights": parents["kd_teacher"],
                                                 "kind": "build"}, progress=b.progress)
        flops = 0 if reused else 2 * b.params_of(m.kd_teacher) * meta["tokens"]
        return StageOutput(folder, meta["windows_sha256"] + meta["tokenizer"], {},
                           {"flops": flops, "teacher_tokens": meta["tokens"], "top_k": meta["top_k"],
                            "bytes_per_token": meta["bytes_per_token"], "reused": bool(reused)},
                           files=[folder / META_FILE, *sorted(folder.glob("shard-*.arrow"))])

    b.stage(f"{m.name}/teacher-logits", settings, parents, fn, log=b.log)
    return folder, plan["shared"]


def search_stage(b: Build, m: MemberSection, scores_dir: Path, cache: Path | None = None) -> dict:
    """The search stage of a member with a budget -> the winning shape (its candidates distilled from `cache`, a
    teacher-logit cache, when given)."""
    from .data import token_windows
    from .importance import ImportanceScores
    from .search import run_search
    from .cached_distill import TeacherCache

    r, folder = b.recipe, b.run.work(m.name) / SEARCH_DIR
    search = m.search_settings(r.search)

    def fn(action) -> StageOutput:
        if action == "redo":
            ranks.on_main(shutil.rmtree, folder, ignore_errors=True)
        windows = token_windows(r.data.eval_source, b.tokenizer(), search.eval_seq_len, search.eval_windows,
                                holdout=r.data.eval_holdout, cache=b.cache)
        teacher = TeacherCache(str(cache)) if cache else b.model(m.kd_teacher)
        return run_search(b.model(m.base), ImportanceScores.load(scores_dir), teacher, b.tokenizer(),
                          b.train_documents(), windows, m.params, search, folder, r.prune,
                          base_path=str(b.run.pruned(m.name)), seed=r.distill.get("seed", 42), progress=b.progress,
                          log=b.log)

    settings = {"budget": m.params, "search": asdict(search), "prune": asdict(r.prune), "kd_teacher": m.kd_teacher,
                "data": asdict(r.data.distillation), "eval": asdict(r.data.eval_source), "holdout": r.data.holdout}
    parents = {"importance": b.run.output_hash(f"importance/{m.base}"), "base": b.identity(m.base),
               "kd_teacher": b.identity(m.kd_teacher)}
    if cache:
        parents["teacher_logits"] = b.run.output_hash(f"{m.name}/teacher-logits")
    b.stage(f"{m.name}/search", settings, parents, fn, log=b.log)
    return b.run.record(f"{m.name}/search")["winner"]


def prune_stage(b: Build, m: MemberSection, shape: dict, scores_dir: Path) -> None:
    from .prune import PruneTarget, run_prune
    from .prune_stream import use_stream

    search = m.search_settings(b.recipe.search)
    merge = bool(m.params) and search.adapter == "merge" and search.tokens > 0  # no retraining: no adapter
    adapter = b.run.work(m.name) / SEARCH_DIR / "adapter" if merge else None
    info = {"teacher": b.source.as_dict(), "base": m.base, "importance": str(scores_dir)}
    parents = {"importance": b.run.output_hash(f"importance/{m.base}"), "base": b.identity(m.base)}
    if m.params:
        parents["search"] = b.run.output_hash(f"{m.name}/search")
    settings = {"shape": shape, "prune": _without(asdict(b.recipe.prune), "mode"),  # how, not what: as importance
                "adapter": "merge" if merge else None}

    def fn(action) -> StageOutput:
        src = b.source_of(m.base)  # a safetensors folder streams (prune.mode auto/stream): the same tensors
        model = src if use_stream(b.recipe.prune.mode, src, adapter) else b.model(m.base)
        return run_prune(model, b.tokenizer(), scores_dir, PruneTarget(**shape), b.recipe.prune, b.run.pruned(m.name),
                         info, adapter, dtype=b.recipe.teacher.dtype)

    b.stage(f"{m.name}/prune", settings, parents, fn, log=b.log, main_only=True)


def _without(settings: dict, *keys: str) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def distill_stage(b: Build, m: MemberSection, shape: dict, cache: Path | None = None) -> None:
    """The distill stage: from the live KD teacher, or from `cache`, a teacher-logit cache (the teacher not loaded)."""
    from .distill import DistillConfig, distill

    r, folder, pruned = b.recipe, b.run.member(m.name), b.run.pruned(m.name)

    def fn(action) -> StageOutput:
        before_training(folder, action)
        config = DistillConfig(output_dir=str(folder), **{**r.distill_settings(m),
                                                          "teacher_cache": str(cache) if cache else None},
                               disable_tqdm=not b.progress)
        res = distill(None if cache else b.model(m.kd_teacher), str(pruned), b.train_documents(), str(folder),
                      config=config,
                      text_column=r.data.distillation.text_column, resume=action == "resume")
        return ranks.on_main(record, res)

    def record(res: dict) -> StageOutput:
        search_json = b.run.work(m.name) / SEARCH_DIR / SEARCH_FILE
        for src in (pruned / PRUNING_FILE, search_json):
            if src.is_file():
                shutil.copy(src, folder / src.name)
        MemberRecord(m.name, "base", teacher=r.teacher.source, pruned_from=m.base, distilled_from=m.kd_teacher,
                     recipe=r.name, shape=shape, tokens={"distillation": res["tokens"]},
                     training={k: res[k] for k in ("losses", "is_pairs", "is_policy", "dtypes")}).write(folder)
        n = b.params_of(m.name)
        return StageOutput(folder, hash_folder(folder, WEIGHTS), {"distillation": res["tokens"]},
                           {"flops": train_flops(n, res["tokens"], 0 if cache else b.params_of(m.kd_teacher)),
                            "parameters": n,
                            "steps": res["steps"], "train_loss": res["train_loss"]})

    settings = {**r.distill_settings(m), "kd_teacher": m.kd_teacher, "data": asdict(r.data.distillation),
                "holdout": r.data.holdout}
    settings.pop("keep_checkpoints", None)
    parents = {"pruned": b.run.output_hash(f"{m.name}/prune"), "kd_teacher": b.identity(m.kd_teacher)}
    if cache:
        parents["teacher_logits"] = b.run.output_hash(f"{m.name}/teacher-logits") or str(cache)
    b.stage(f"{m.name}/distill", settings, parents, fn, log=b.log)


def sft_stage(b: Build, m: MemberSection) -> None:
    from .sft import InstructConfig, sft

    r, base, out = b.recipe, b.run.member(m.name), b.run.member(m.name + INSTRUCT_SUFFIX)

    def fn(action) -> StageOutput:
        before_training(out, action)
        config = InstructConfig(output_dir=str(out), **r.sft, disable_tqdm=not b.progress)
        res = sft(str(base), r.data.sft, str(out), config=config, resume=action == "resume")
        return ranks.on_main(record, res)

    def record(res: dict) -> StageOutput:
        for name in (PRUNING_FILE, SEARCH_FILE):  # the instruct card shows its base's lineage too
            if (base / name).is_file():
                shutil.copy(base / name, out / name)
        MemberRecord(out.name, "instruct", teacher=r.teacher.source, sft_from=m.name, recipe=r.name,
                     tokens={"sft": res["tokens"]}).write(out)
        return StageOutput(out, hash_folder(out, WEIGHTS), {"sft": res["tokens"]},
                           {"flops": train_flops(b.params_of(m.name), res["tokens"])})

    settings = {**r.sft, "data": asdict(r.data.sft)}
    settings.pop("keep_checkpoints", None)
    b.stage(f"{m.name}/sft", settings, {"distill": b.run.output_hash(f"{m.name}/distill")}, fn, log=b.log)


def evaluate_stage(b: Build, key: str, models: list[tuple[str, object, Path]], parents: dict) -> None:
    """`evaluate_model` on each (name, model loader, results file): held-out perplexity, the recipe's tasks."""
    from .evaluate import evaluate_model

    r = b.recipe

    def fn(action) -> StageOutput:
        results = {}
        for name, load, out in models:
            model, tokenizer = load()
            res = evaluate_model(model, tokenizer, name, r.evaluate, [r.data.eval_source], r.data.eval_holdout,
                                 out=out, progress=b.progress, cache=b.cache)
            ppl = res["perplexity"][0]
            b.log(f"  {name}: perplexity {ppl['perplexity']:,.2f} on {ppl['tokens']:,} held-out tokens")
            results[name] = ppl["perplexity"]
        return StageOutput(models[0][2].parent, hash_json(results), record={"results": results},
                           files=[out for _, _, out in models])  # a lost results file is evaluated again

    settings = {**asdict(r.evaluate), "data": asdict(r.data.eval_source), "holdout": r.data.holdout}
    settings.pop("teacher")
    b.stage(key, settings, parents, fn, log=b.log, main_only=True)  # forwards only; lm-eval runs in one process


def before_training(folder: Path, action: str) -> None:
    """The main process clears a redone stage's folder, or sets aside the incomplete checkpoints of a resumed one
    (as `distill`/`sft` would in every process at once), before any process starts training into it."""
    from .checkpoints import last_complete_checkpoint

    if action == "redo":
        ranks.on_main(shutil.rmtree, folder, ignore_errors=True)
    elif action == "resume":
        ranks.on_main(last_complete_checkpoint, folder)


def member_loader(b: Build, folder: Path):
    from .models import load_model, load_tokenizer

    return lambda: (load_model(str(folder), dtype=b.recipe.teacher.dtype), load_tokenizer(str(folder)))
