"""The build: one recipe in, one family of members out, resumable at any point.

importance of the teacher (once, cached) -> per member: search (when it gives a parameter budget) -> prune ->
distill -> optional SFT -> evaluate -> member folder; then the family report and, when the recipe asks, publishing
(family.py). A member with `parent` is pruned from its parent's distilled
weights (importance is then computed once on the parent) and distilled from the configured teacher, the parent by
default: the paper's 15B -> 8B -> 4B path. Every stage goes through `RunDir.plan`, so re-running skips finished
stages and resumes an interrupted one (distillation and SFT from their last checkpoint).

Every stage records its tokens and estimated FLOPs in the manifest; `cost.py` adds them up per member against
training it from scratch, for the summary printed at the end.

Run: `hf-minitron build --recipe recipes/quickstart.yaml [--teacher T] [--out RUN] [--force STAGE] [key=value ...]`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cost import account, si, summary
from .data import TextSource
from .recipe import Recipe
from .rundir import RunDir, hash_folder, hash_json, open_run

STAGES = ("importance", "search", "prune", "distill", "sft", "evaluate", "publish")


def _same_text(a: TextSource | None, b: TextSource | None) -> bool:
    keys = ("path", "config", "split", "text_column", "revision")
    return a is not None and b is not None and all(getattr(a, k) == getattr(b, k) for k in keys)


@dataclass
class _Build:
    """What the stages share: the recipe, the run folder, the teacher and cached models, data and scores."""

    recipe: Recipe
    run: RunDir
    source: object  # ModelSource of the teacher
    progress: bool = True
    log: object = print
    models: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def tokenizer(self):
        if "tokenizer" not in self.cache:
            from .models import load_tokenizer

            self.cache["tokenizer"] = load_tokenizer(self.source, self.recipe.teacher.trust_remote_code)
        return self.cache["tokenizer"]

    def model(self, ref: str):
        """'teacher', a member name (its distilled folder) or another model spec, loaded once."""
        if ref not in self.models:
            from .models import load_model

            t = self.recipe.teacher
            if ref == "teacher":
                self.log(f"loading teacher {t.source}")
                self.models[ref] = load_model(self.source, dtype=t.dtype, device=t.device,
                                              trust_remote_code=t.trust_remote_code)
            else:
                path = self.run.member(ref) if self._is_member(ref) else ref
                self.models[ref] = load_model(str(path), dtype=t.dtype, device=t.device)
        return self.models[ref]

    def _is_member(self, ref: str) -> bool:
        return any(m.name == ref for m in self.recipe.members)

    def identity(self, ref: str) -> str:
        """A hash naming a model's exact weights: the teacher's source, a member's distilled output, a spec."""
        if ref == "teacher":
            return hash_json({**self.source.as_dict(), "dtype": self.recipe.teacher.dtype})
        if self._is_member(ref):
            return self.run.output_hash(f"{ref}/distill") or "unbuilt"
        return hash_json({"spec": ref})

    def params_of(self, ref: str) -> int:
        from transformers import AutoConfig

        from .archs import count_parameters
        from .prune import load_config
        from .recipe import teacher_config

        if ref == "teacher":
            config = teacher_config(self.recipe) if self.recipe.teacher.config else load_config(self.source)
        else:
            config = AutoConfig.from_pretrained(self.run.member(ref) if self._is_member(ref) else ref)
        return count_parameters(config)

    # ---- data ----
    def eval_source(self) -> TextSource:
        return self.recipe.data.evaluation or self.recipe.data.distillation

    def train_documents(self):
        """The distillation source, minus its held-out tail when evaluation reads the same source."""
        if "train" not in self.cache:
            from .data import load_text_dataset

            src = self.recipe.data.distillation
            ds = load_text_dataset(src)
            k = self._holdout_count(ds, src)
            self.cache["train"] = ds.select(range(len(ds) - k)) if k else ds
        return self.cache["train"]

    def _holdout_count(self, ds, src: TextSource) -> int:
        if src.streaming or not _same_text(src, self.eval_source()) or self.recipe.data.holdout == 0:
            return 0
        return max(1, int(len(ds) * self.recipe.data.holdout)) if len(ds) > 1 else 0

    def heldout_windows(self, seq_len: int, windows: int):
        """Consecutive windows of the evaluation text (its held-out tail when it is also training text)."""
        import torch

        from .data import DataSourceError, load_text_dataset

        key = ("windows", seq_len, windows)
        if key not in self.cache:
            src = self.eval_source()
            ds = load_text_dataset(src)
            k = self._holdout_count(ds, src)
            rows = ds.select(range(len(ds) - k, len(ds))) if k else ds
            tok, ids = self.tokenizer(), []
            for row in rows:
                if row[src.text_column]:
                    ids += tok(row[src.text_column], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                if len(ids) >= seq_len * windows:
                    break
            n = min(windows, len(ids) // seq_len)
            if n == 0:
                raise DataSourceError(f"evaluation text {src.path!r} (held-out part) has {len(ids)} tokens, fewer "
                                      f"than one window of {seq_len}")
            self.cache[key] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        return self.cache[key]


def _stage(b: _Build, key: str, settings: dict, parents: dict, fn) -> dict:
    return b.run.stage(key, settings, parents, fn, log=b.log)


def _importance(b: _Build, base: str) -> Path:
    from .data import pack_tokens
    from .importance import ImportanceConfig, compute_importance

    imp, folder = b.recipe.importance, b.run.importance(base)

    def fn(action):
        model = b.model(base)
        packed = pack_tokens(b.recipe.data.calibration, b.tokenizer(), imp.samples, imp.seq_len,
                             seed=imp.seed)
        config = ImportanceConfig(batch_size=imp.batch_size, depth_ppl_samples=imp.depth_ppl_samples,
                                  default_batch_agg=imp.batch_agg, default_seq_agg=imp.seq_agg)
        scores = compute_importance(model, packed.input_ids, config, {"base": base, "data": packed.source},
                                    progress=b.progress)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        scores.save(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        tokens = imp.samples * imp.seq_len
        return folder, hash_folder(folder), {"calibration": tokens}, {"flops": 2 * b.params_of(base) * tokens}

    settings = {**asdict(imp), "data": asdict(b.recipe.data.calibration)}
    _stage(b, f"importance/{base}", settings, {"model": b.identity(base)}, fn)
    return folder


def _distill_args(b: _Build) -> dict:
    d = b.recipe.distill
    return dict(max_length=d.seq_len, per_device_train_batch_size=d.batch_size, gradient_accumulation_steps=d.grad_accum,
                learning_rate=d.lr, warmup_steps=d.warmup, logit_loss=d.logit_loss, temperature=d.temperature,
                top_k=d.top_k, w_clm=d.w_clm, is_layers=d.is_layers, save_steps=d.save_steps,
                logging_steps=d.logging_steps, seed=d.seed, report_to=[], disable_tqdm=not b.progress,
                **{"gradient_checkpointing": False, **d.options})


def _drop_checkpoints(folder: Path) -> None:
    for ckpt in folder.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)


def build_member(b: _Build, m, until: str | None = None) -> None:
    """search -> prune -> distill -> SFT -> evaluate for one member, each stage skipped when already done."""
    from .importance import ImportanceScores
    from .prune import PruneOptions, PruneTarget, plan_summary, prune_model, save_student

    r, run = b.recipe, b.run
    base = m.parent or "teacher"
    scores_dir = _importance(b, base)
    kd_ref = m.teacher or ("parent" if m.parent else "teacher")
    kd_ref = m.parent if kd_ref == "parent" else kd_ref
    options = PruneOptions(depth_metric=r.importance.depth_metric)
    parents = {"importance": run.output_hash(f"importance/{base}"), "base": b.identity(base)}
    shape = asdict(m.shape) if m.shape else None
    search_dir = run.work(m.name) / "search"
    search = m.search_settings(r.search)
    if m.params:
        from .search import run_search

        def search_fn(action):
            if action == "redo":
                shutil.rmtree(search_dir, ignore_errors=True)
            teacher = b.model(kd_ref)
            windows = b.heldout_windows(search.eval_seq_len, search.eval_windows)
            res = run_search(b.model(base), ImportanceScores.load(scores_dir), teacher, b.tokenizer(),
                             b.train_documents(), windows, m.params, search, search_dir, options,
                             base_path=str(run.pruned(m.name)), seed=r.distill.seed, progress=b.progress, log=b.log)
            n_kd = b.params_of(kd_ref)
            flops = sum((6 * c["params"] + 2 * n_kd) * c["tokens"] for c in res["candidates"])
            return search_dir, hash_folder(search_dir), {"search": res["tokens"]}, {"flops": flops,
                                                                                   "winner": res["winner"]["shape"]}

        settings = {"budget": m.params, "search": asdict(search), "prune": asdict(options), "kd_teacher": kd_ref,
                    "data": asdict(r.data.distillation), "eval": asdict(b.eval_source()), "holdout": r.data.holdout}
        _stage(b, f"{m.name}/search", settings, {**parents, "kd_teacher": b.identity(kd_ref)}, search_fn)
        shape = json.loads((search_dir / "search.json").read_text())["winner"]["shape"]
        parents["search"] = run.output_hash(f"{m.name}/search")
    if until == "search":
        return

    pruned = run.pruned(m.name)

    def prune_fn(action):
        base_model = b.model(base)
        target = PruneTarget(**shape)
        student, plan = prune_model(base_model, ImportanceScores.load(scores_dir), target, options)
        merged = bool(m.params) and search.adapter == "merge"
        if merged:
            from .search import merge_adapter

            student = merge_adapter(student, search_dir / "adapter")
        info = {"teacher": b.source.as_dict(), "base": base, "importance": str(scores_dir),
                "search_adapter_merged": merged, **plan_summary(plan, target, options, base_model.config)}
        tmp = pruned.with_name(pruned.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_student(student, tmp, b.tokenizer(), info)
        shutil.rmtree(pruned, ignore_errors=True)
        tmp.rename(pruned)
        return pruned, hash_folder(pruned), {}, {"parameters": info["student_parameters"]}

    _stage(b, f"{m.name}/prune", {"shape": shape, "prune": asdict(options),
                                  "adapter": search.adapter if m.params else None}, parents, prune_fn)

    from .distill import distill

    folder, tokens = run.member(m.name), m.distill_tokens or r.distill.tokens

    def distill_fn(action):
        if action == "redo":
            shutil.rmtree(folder, ignore_errors=True)
        res = distill(b.model(kd_ref), str(pruned), b.train_documents(), str(folder), tokens,
                      resume=action == "resume", **_distill_args(b))
        for name in ("pruning.json", "search.json"):
            src = (search_dir if name == "search.json" else pruned) / name
            if src.is_file():
                shutil.copy(src, folder / name)
        (folder / "member.json").write_text(json.dumps(
            {"name": m.name, "parent": m.parent, "teacher": r.teacher.source, "distilled_from": kd_ref,
             "instruct": False, "recipe": r.name}, indent=1) + "\n")
        if not r.distill.keep_checkpoints:
            _drop_checkpoints(folder)
        n = b.params_of(m.name)
        flops = (6 * n + 2 * b.params_of(kd_ref)) * res["tokens"]
        return folder, hash_folder(folder, ("*.safetensors", "config.json")), {"distillation": res["tokens"]}, \
            {"flops": flops, "parameters": n, "steps": res["steps"], "train_loss": res["train_loss"]}

    distill_settings = {**asdict(r.distill), "tokens": tokens, "kd_teacher": kd_ref,
                        "data": asdict(r.data.distillation), "holdout": r.data.holdout}
    distill_settings.pop("keep_checkpoints")
    _stage(b, f"{m.name}/distill", distill_settings, {"pruned": run.output_hash(f"{m.name}/prune"),
                                                      "kd_teacher": b.identity(kd_ref)}, distill_fn)
    eval_parents = {"distill": run.output_hash(f"{m.name}/distill")}
    folders = [(m.name, folder)]
    if m.instruct:
        instruct = run.member(m.name + "-instruct")
        _sft(b, m, folder, instruct)
        eval_parents["sft"] = run.output_hash(f"{m.name}/sft")
        folders.append((m.name + "-instruct", instruct))
    _evaluate(b, f"{m.name}/evaluate", folders, eval_parents)


def _sft(b: _Build, m, folder: Path, out: Path) -> None:
    from .sft import sft

    s, src = b.recipe.sft, b.recipe.data.sft

    def fn(action):
        if action == "redo":
            shutil.rmtree(out, ignore_errors=True)
        res = sft(str(folder), src.path, str(out), chat_template=s.chat_template, lora=s.lora, lora_r=s.lora_r,
                  lora_alpha=2 * s.lora_r, split=src.split, resume=action == "resume", num_train_epochs=s.epochs,
                  max_steps=s.max_steps, learning_rate=s.lr, per_device_train_batch_size=s.batch_size,
                  max_length=s.max_length, save_steps=s.save_steps, report_to=[], gradient_checkpointing=False,
                  disable_tqdm=not b.progress)
        tokens = max([h.get("num_tokens", 0) for h in res["log_history"]] + [0])
        (out / "member.json").write_text(json.dumps({"name": out.name, "parent": m.name, "teacher":
                                                     b.recipe.teacher.source, "instruct": True}, indent=1) + "\n")
        _drop_checkpoints(out)
        return out, hash_folder(out, ("*.safetensors", "config.json")), {"sft": int(tokens)}, \
            {"flops": 6 * b.params_of(m.name) * int(tokens)}

    _stage(b, f"{m.name}/sft", {**asdict(s), "data": asdict(src)}, {"distill": b.run.output_hash(f"{m.name}/distill")},
           fn)


def _evaluate(b: _Build, key: str, folders: list[tuple[str, Path | str]], parents: dict) -> None:
    """Perplexity on held-out text (and lm-eval tasks when the recipe lists them) -> eval_results.json."""
    from .archs import count_parameters
    from .evaluate import perplexity, run_lm_eval, save_results
    from .models import load_model, load_tokenizer

    e, src = b.recipe.evaluate, b.eval_source()

    def fn(action):
        results = {}
        windows = b.heldout_windows(e.seq_len, e.windows)
        for name, folder in folders:
            model = b.model("teacher") if folder == "teacher" else load_model(str(folder), dtype=b.recipe.teacher.dtype)
            record = {"data": src.path, "config": src.config, "split": src.split, "seq_len": e.seq_len,
                      "stride": e.seq_len, "tokens": windows.numel(), "heldout_share": b.recipe.data.holdout
                      if _same_text(src, b.recipe.data.distillation) else None,
                      "perplexity": perplexity(model, windows, progress=b.progress)}
            result = {"model": name, "parameters": count_parameters(model.config), "perplexity": [record], "tasks": {}}
            if e.tasks:
                tok = b.tokenizer() if folder == "teacher" else load_tokenizer(str(folder))
                result["tasks"] = run_lm_eval(model, tok, {t: None for t in e.tasks}, limit=e.limit)
            out = b.run.root / "eval" / "teacher.json" if folder == "teacher" else Path(folder) / "eval_results.json"
            save_results(result, out)
            results[name] = result
            b.log(f"  {name}: perplexity {record['perplexity']:,.2f} on {windows.numel():,} held-out tokens")
        path = b.run.root / "eval" if folders[0][1] == "teacher" else Path(folders[0][1])
        return path, hash_json(results), {}, {"results": {n: r["perplexity"][0]["perplexity"] for n, r in
                                                          results.items()}}

    settings = {**asdict(e), "data": asdict(src), "holdout": b.recipe.data.holdout}
    settings.pop("teacher")
    _stage(b, key, settings, parents, fn)


def _with_ancestors(recipe: Recipe, names) -> list[str]:
    wanted = set()
    for name in names:
        m = recipe.member(name)
        while m is not None:
            wanted.add(m.name)
            m = recipe.member(m.parent) if m.parent else None
    return [m.name for m in recipe.members if m.name in wanted]


def _release(b: _Build, remaining) -> None:
    """Drop cached models no remaining member prunes from or distils from (a 15B teacher need not stay for the 4B)."""
    needed = set()
    for m in remaining:
        kd = m.teacher or ("parent" if m.parent else "teacher")
        needed |= {m.parent or "teacher", m.parent if kd == "parent" else kd}
    for ref in [r for r in b.models if r not in needed]:
        del b.models[ref]


def build(recipe: Recipe, out: str | Path, force: list[str] = (), members: list[str] | None = None,
          until: str | None = None, progress: bool = True, log=print) -> dict:
    """Build (or finish building) the recipe's family into the run folder `out`; returns the cost record.

    `force`: stages to redo, `stage` or `member:stage` (their downstream stages follow). `members`: build only
    these (and their ancestors). `until='search'`: stop the named members after their search stage.
    """
    import time

    from .models import resolve_source

    for f in force:
        stage = f.rpartition(":")[2]
        if stage not in STAGES:
            raise ValueError(f"--force {f!r}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    t = recipe.teacher
    source = resolve_source(t.source, revision=t.revision, gguf_file=t.gguf_file)
    run = open_run(out, recipe, source.as_dict(), force)
    b = _Build(recipe, run, source, progress, log)
    started = time.time()
    names = _with_ancestors(recipe, members) if members else [m.name for m in recipe.members]
    targets = set(members or names)
    if recipe.evaluate.teacher and until is None:
        _evaluate(b, "teacher/evaluate", [("teacher", "teacher")], {"teacher": b.identity("teacher")})
    for i, name in enumerate(names):
        m = recipe.member(name)
        _release(b, [recipe.member(n) for n in names[i:]])
        log(f"== member {name} ({'budget ' + si(m.params) if m.params else 'explicit shape'}"
            f"{', from ' + m.parent if m.parent else ''})")
        build_member(b, m, until if name in targets else None)
    if until is None:
        from .family import publish_stage, report_family

        report_family(recipe, run, log)
        if recipe.publish.org:
            publish_stage(recipe, run, log)
    cost = account(run, recipe)
    run.manifest["cost"] = cost
    run.manifest["members"] = cost["members"]
    run.manifest["builds"].append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "seconds": round(time.time() - started), "actions": run.actions})
    run.save()
    if until is None:
        log(summary(run, recipe, cost, b.params_of("teacher")))
    return {**cost, "actions": run.actions, "run": str(run.root)}
