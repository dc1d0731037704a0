"""Compare the members of an hf-minitron family side by side: one prompt, every picked member streaming its answer.

Self-contained on purpose: this file needs only what `requirements.txt` lists (gradio, torch, transformers), not
hf_minitron, so the same file runs as a Hugging Face Space and locally through `hf-minitron space RUN`.

The family file (JSON, or YAML when PyYAML is installed) is found in this order: the `FAMILY_FILE` environment
variable, then `family.json` / `family.yaml` / `family.yml` next to this file, then `family.example.json`:

    {
      "name": "SmolLM2 Minitron family",
      "teacher": "HuggingFaceTB/SmolLM2-135M",          # optional; a member-like object ({"name": "teacher",
                                                        # "model": ...}) also gets a column, first, as the reference
      "description": "markdown shown under the title",   # optional
      "members": [
        {"name": "smollm2-100m", "model": "my-org/smollm2-100m",   # Hub id, or a local folder (relative to the file)
         "instruct": false,                                      # true: the chat template wraps the prompt
         "params": 100000000,                                    # optional, shown in the picker and the table
         "revision": null, "gguf_file": null, "dtype": null,     # optional, passed to from_pretrained
         "eval": {"hellaswag acc_norm": 0.31}}                   # optional: flat metrics or an eval_results record
      ],
      "results": "family_results.json",   # optional: eval_results records (a list) or a file holding them
      "plot": "family.png"                # optional: the family plot (quality vs parameters)
    }

Limits, so that one visitor cannot hold the Space: a prompt keeps at most `MAX_PROMPT_TOKENS` tokens (its end; 1024
unless that environment variable says otherwise) and never more than the model's context leaves room for; generations
run through Gradio's queue, `CONCURRENCY_LIMIT` (default 1) at a time, each one on every picked member at once.
Members load from safetensors only (or a GGUF file the family names), never from pickled weights.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILY_ENV = "FAMILY_FILE"
DEFAULT_FAMILY_FILES = ("family.json", "family.yaml", "family.yml", "family.example.json")
MAX_PROMPT_TOKENS = int(os.environ.get("MAX_PROMPT_TOKENS", "1024"))
CONCURRENCY_LIMIT = int(os.environ.get("CONCURRENCY_LIMIT", "1"))
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", "32"))  # waiting requests beyond this are refused with a message
CHARS_PER_TOKEN = 16  # more than any tokenizer packs into a token of ordinary text: the prompt is cut to this first
# the metric a table shows for a task, in order of preference (as hf_minitron.evaluate.primary_metric)
PRIMARY_METRICS = ["acc_norm", "acc", "mc2", "exact_match,strict-match", "exact_match", "pass@1", "pass_at_1"]


class FamilyError(ValueError):
    pass


# ---- the family file ----


@dataclass
class Member:
    name: str
    model: str  # Hub id or local folder (absolute once loaded)
    instruct: bool = False
    params: int | None = None
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str | None = None
    eval: dict | None = None
    teacher: bool = False  # the family's teacher: the first column, the reference the members are compared with

    @property
    def label(self) -> str:
        extra = (["teacher"] if self.teacher and self.name != "teacher" else []) + \
            ([human(self.params)] if self.params else [])
        if self.instruct:
            extra.append("instruct")
        return f"{self.name} ({', '.join(extra)})" if extra else self.name


@dataclass
class Family:
    name: str
    members: list[Member]
    teacher: str | None = None
    description: str | None = None
    results: list[dict] = field(default_factory=list)
    plot: Path | None = None
    source: Path | None = None  # the family file, when read from one

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise FamilyError(f"no member named {name!r} in the family (members: {[m.name for m in self.members]})")


def read_structured(path: Path):
    """A family file's data: YAML for .yaml/.yml, else JSON (hf_minitron.space reads family files through it)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def _is_local(spec: str, base: Path) -> Path | None:
    p = Path(spec).expanduser()
    p = p if p.is_absolute() else base / p
    return p.resolve() if p.exists() else None


def family_from_dict(data: dict, base: str | Path = ".") -> Family:
    """A `Family` from the parsed family file; relative paths are taken from `base` (the file's folder)."""
    base = Path(base)
    if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
        raise FamilyError("a family file needs a non-empty 'members' list")
    teacher = data.get("teacher")
    listed = ([("teacher", {**teacher, "teacher": True})] if isinstance(teacher, dict) else []) + \
        [(f"members[{i}]", raw) for i, raw in enumerate(data["members"])]
    members, seen = [], set()
    for where, raw in listed:
        member = _member(where, raw, base)
        if member.name in seen:
            raise FamilyError(f"two members are named {member.name!r}; give them distinct 'name's")
        seen.add(member.name)
        members.append(member)
    if isinstance(teacher, dict):
        teacher = teacher.get("source") or members[0].model
    results = data.get("results") or []
    if isinstance(results, (str, Path)):
        found = _is_local(str(results), base)
        results = json.loads(found.read_text()) if found else []
    if isinstance(results, dict):
        results = [results]
    plot = _is_local(str(data["plot"]), base) if data.get("plot") else None
    return Family(name=data.get("name") or "hf-minitron family", members=members, teacher=teacher,
                  description=data.get("description"), results=list(results), plot=plot)


def _member(where: str, raw, base: Path) -> Member:
    """One member of the family file (`where` names it in errors), local paths taken from `base`."""
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict) or not raw.get("model"):
        raise FamilyError(f"{where} needs a 'model' (a Hub id or a local folder)")
    raw = {k: v for k, v in raw.items() if not (where == "teacher" and k == "source")}  # the teacher's spec
    unknown = set(raw) - set(Member.__dataclass_fields__)
    if unknown:
        raise FamilyError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(Member.__dataclass_fields__)})")
    local = _is_local(str(raw["model"]), base)
    raw["model"] = str(local) if local else str(raw["model"])
    raw.setdefault("name", Path(str(raw["model"]).rstrip("/")).name)
    raw["instruct"] = bool(raw.get("instruct", False))
    if isinstance(raw.get("eval"), (str, Path)):  # a path to the member's eval_results.json
        found = _is_local(str(raw["eval"]), base)
        raw["eval"] = json.loads(found.read_text()) if found else None
    return Member(**raw)


def load_family(path: str | Path) -> Family:
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"family file {str(path)!r} does not exist")
    family = family_from_dict(read_structured(path), base=path.resolve().parent)
    family.source = path.resolve()
    return family


def default_family_file() -> Path | None:
    if os.environ.get(FAMILY_ENV):
        return Path(os.environ[FAMILY_ENV])
    return next((HERE / n for n in DEFAULT_FAMILY_FILES if (HERE / n).is_file()), None)


# ---- the evaluation table ----


def human(n) -> str:
    if n is None:
        return "–"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _record_values(record: dict) -> dict:
    """Table columns of one results record: eval_results.json layout, or flat {metric: number}."""
    if "perplexity" not in record and "tasks" not in record:
        return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k not in ("parameters", "params")}
    values = {}
    for ppl in record.get("perplexity") or []:
        values[f"ppl {Path(str(ppl.get('data', 'text'))).stem}"] = ppl.get("perplexity")
    for task, res in (record.get("tasks") or {}).items():
        metrics = res.get("metrics", {})
        name = next((m for m in PRIMARY_METRICS if m in metrics), None) or \
            next((m for m in metrics if "stderr" not in m), None)
        if name is not None:
            values[f"{task} {name}"] = metrics[name]
    return values


def eval_table(family: Family) -> tuple[list[str], list[list]]:
    """Headers and rows (largest model first): the family's results records, then members' own `eval`."""
    rows: dict[str, dict] = {}
    for record in family.results:
        name = record.get("model") or "?"
        rows[name] = {"parameters": record.get("parameters"), "values": _record_values(record)}
    for m in family.members:
        row = rows.setdefault(m.name, {"parameters": m.params, "values": {}})
        row["parameters"] = row["parameters"] or m.params or (m.eval or {}).get("parameters")
        if m.eval:
            row["values"] = {**_record_values(m.eval), **row["values"]}
    rows = {k: v for k, v in rows.items() if v["values"]}
    if not rows:
        return [], []
    columns: list[str] = []
    for row in rows.values():
        columns += [c for c in row["values"] if c not in columns]
    ordered = sorted(rows.items(), key=lambda kv: -(kv[1]["parameters"] or 0))
    top = ordered[0][1]["parameters"] or 0
    table = []
    for name, row in ordered:
        share = f"{100 * row['parameters'] / top:.0f}%" if top and row["parameters"] else "–"
        table.append([name, human(row["parameters"]), share] +
                     [round(row["values"][c], 4) if isinstance(row["values"].get(c), (int, float)) else None
                      for c in columns])
    return ["model", "parameters", "size"] + columns, table


# ---- models and generation ----


_IMPORT_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()


def _import_generation():
    """torch and transformers' lazily imported classes, imported once: two threads importing them at the same time
    can see a half-initialised module (ImportError)."""
    with _IMPORT_LOCK:
        import torch
        from transformers import (AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList,
                                  TextIteratorStreamer)

        return torch, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


def pick_device() -> str:
    torch = _import_generation()[0]

    return os.environ.get("SPACE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


class ModelCache:
    """Members load on first use, once (one lock per member), and stay loaded."""

    def __init__(self, device: str | None = None):
        self.device = device
        self._loaded: dict[str, tuple] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __contains__(self, member: Member) -> bool:
        return member.name in self._loaded

    def get(self, member: Member):
        with self._guard:
            lock = self._locks.setdefault(member.name, threading.Lock())
        with lock:
            if member.name not in self._loaded:
                self._loaded[member.name] = load_member(member, self.device or pick_device())
            return self._loaded[member.name]


def load_member(member: Member, device: str = "cpu"):
    torch, AutoModelForCausalLM, AutoTokenizer = _import_generation()[:3]

    kwargs = {k: v for k, v in (("revision", member.revision), ("gguf_file", member.gguf_file)) if v}
    # float32 on CPU (bfloat16 matmuls are slow there); the checkpoint's own dtype on an accelerator
    dtype = getattr(torch, member.dtype) if member.dtype else (torch.float32 if device == "cpu" else "auto")
    weights = {} if member.gguf_file else {"use_safetensors": True}  # never a pickled checkpoint
    with _LOAD_LOCK:  # from_pretrained patches torch globally while it builds the model: one at a time
        tokenizer = AutoTokenizer.from_pretrained(member.model, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(member.model, dtype=dtype, **weights, **kwargs).to(device).eval()
    return model, tokenizer


@dataclass
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    greedy: bool = False
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def generate_kwargs(self) -> dict:
        if self.greedy or self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_p": float(self.top_p)}


@dataclass
class Progress:
    text: str = ""
    tokens: int = 0
    first_token_s: float | None = None  # latency: prompt in, first new token out
    elapsed_s: float = 0.0
    done: bool = False
    error: str | None = None
    loading: bool = False
    stopped: bool = False
    prompt_tokens: int = 0  # what the model was given
    clipped: bool = False  # the prompt was longer than the limits: its start was cut

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.elapsed_s if self.tokens and self.elapsed_s > 0 else None

    def stats(self) -> str:
        if self.error:
            return f"**error:** {self.error}"
        if self.loading:
            return "loading the model…"
        if self.first_token_s is None:
            return "waiting for the first token…" if not self.done else "no tokens generated"
        rate = f"{self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s else "– tokens/s"
        state = " (stopped)" if self.stopped else "" if self.done else " (generating)"
        cut = f" · prompt cut to its last {self.prompt_tokens} tokens" if self.clipped else ""
        return (f"latency (first token) **{self.first_token_s:.2f} s** · {self.tokens} tokens in "
                f"{self.elapsed_s:.2f} s · **{rate}**{state}{cut}")


def build_prompt(tokenizer, prompt: str, instruct: bool) -> str:
    """The text the model sees: the chat template around the prompt for instruct members, else the prompt itself."""
    if instruct and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def clip_prompt(tokenizer, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """The prompt's last `max_tokens` tokens (characters are cut first, so a pasted book is never tokenized whole),
    and whether anything was cut."""
    short = prompt[-max_tokens * CHARS_PER_TOKEN:]
    ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens and short == prompt:
        return prompt, False
    return tokenizer.decode(ids[-max_tokens:]), True


def stream_generate(model, tokenizer, prompt: str, instruct: bool = False, settings: Settings | None = None,
                    stop: threading.Event | None = None) -> Iterator[Progress]:
    """Generate in a worker thread and yield the growing answer with its token count and timings."""
    torch, _, _, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer = _import_generation()

    settings = settings or Settings()
    max_new = int(settings.max_new_tokens)
    context = getattr(model.config, "max_position_embeddings", None)  # prompt + answer must fit in it
    if context:
        max_new = max(min(max_new, context // 2), 1)
    room = min(int(settings.max_prompt_tokens), context - max_new) if context else int(settings.max_prompt_tokens)
    prompt, clipped = clip_prompt(tokenizer, prompt, room)
    text = build_prompt(tokenizer, prompt, instruct)
    # a chat template already holds the special tokens it needs
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not (instruct and text != prompt))
    if inputs["input_ids"].shape[1] > room:  # the template's own tokens pushed it over: keep the end
        inputs, clipped = {k: v[:, -room:] for k, v in inputs.items()}, True
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    progress = Progress(prompt_tokens=int(inputs["input_ids"].shape[1]), clipped=clipped)
    start = time.perf_counter()

    class CountingStreamer(TextIteratorStreamer):
        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                if progress.first_token_s is None:
                    progress.first_token_s = time.perf_counter() - start
                progress.tokens += int(value.numel())
            super().put(value)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return bool(stop is not None and stop.is_set())

    streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(**inputs, max_new_tokens=max_new, streamer=streamer, pad_token_id=pad,
                  stopping_criteria=StoppingCriteriaList([Stop()]), **settings.generate_kwargs())
    failure: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # reported to the caller; the streamer must still end
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    for chunk in streamer:
        progress.text += chunk
        progress.elapsed_s = time.perf_counter() - start
        yield progress
    thread.join()
    progress.elapsed_s = time.perf_counter() - start
    progress.done = True
    progress.stopped = stop is not None and stop.is_set()
    if failure:
        progress.error = f"{type(failure[0]).__name__}: {failure[0]}"
    yield progress


def generate(model, tokenizer, prompt: str, instruct: bool = False, settings: Settings | None = None,
             stop: threading.Event | None = None) -> Progress:
    """The whole answer at once (the last state of `stream_generate`)."""
    last = Progress(done=True)
    for state in stream_generate(model, tokenizer, prompt, instruct, settings, stop):
        last = state
    return last


def compare(family: Family, cache: ModelCache, prompt: str, selected: list[str], settings: Settings,
            stop: threading.Event | None = None, interval: float = 0.1) -> Iterator[dict[str, Progress]]:
    """Every selected member generates at the same time; yields {member name: its progress} as they stream."""
    _import_generation()  # here, before the threads
    states = {name: Progress(loading=family.member(name) not in cache) for name in selected}
    updates: queue.Queue = queue.Queue()

    def run(name: str):
        try:
            model, tokenizer = cache.get(family.member(name))
            states[name] = Progress()
            updates.put(name)
            for p in stream_generate(model, tokenizer, prompt, family.member(name).instruct, settings, stop):
                states[name] = p
                updates.put(name)
        except Exception as e:  # one member failing (download, memory) must not stop the others
            states[name] = Progress(done=True, error=f"{type(e).__name__}: {e}")
        finally:
            states[name].done = True
            updates.put(None)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in selected]
    for t in threads:
        t.start()
    yield dict(states)
    finished = 0
    while finished < len(threads):
        try:
            items = [updates.get(timeout=interval)]
        except queue.Empty:  # nothing new (a model still loading): nothing to send
            continue
        while True:  # drain what arrived meanwhile: the page needs the latest state, not every step
            try:
                items.append(updates.get_nowait())
            except queue.Empty:
                break
        finished += sum(item is None for item in items)
        yield dict(states)


# ---- the app ----

CSS = """
.member-output textarea { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


def build_app(family: Family | None = None, cache: ModelCache | None = None, error: str | None = None,
              max_prompt_tokens: int | None = None, concurrency_limit: int | None = None):
    """The Gradio Blocks: a Compare tab (prompt, settings, one output column per member) and an Evaluation tab.
    Prompts keep at most `max_prompt_tokens` tokens; `concurrency_limit` generations run at a time, the rest wait
    in the queue (defaults: MAX_PROMPT_TOKENS, CONCURRENCY_LIMIT)."""
    import gradio as gr

    max_prompt_tokens = max_prompt_tokens or MAX_PROMPT_TOKENS
    concurrency_limit = concurrency_limit or CONCURRENCY_LIMIT

    cache = cache or ModelCache()
    title = family.name if family else "hf-minitron family"
    with gr.Blocks(title=title, fill_width=True) as demo:
        gr.Markdown(f"# {title}")
        if family is None:
            gr.Markdown(f"**No family file.** {error or ''} Set `{FAMILY_ENV}` or put `family.json` next to app.py "
                        "(see `family.example.json`).", elem_id="family-error")
            return demo
        intro = family.description or ("Members of one family, pruned and distilled from "
                                       f"`{family.teacher}` with hf-minitron." if family.teacher else "")
        if intro:
            gr.Markdown(intro)
        names = [m.name for m in family.members]  # the teacher, when the family file gives one, first
        default = names if len(names) <= 4 else names[:3 if family.members[0].teacher else 2]
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    picked = gr.CheckboxGroup(choices=[(m.label, m.name) for m in family.members], value=default,
                                              label="Members", elem_id="members")
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                        max_length=max_prompt_tokens * CHARS_PER_TOKEN,
                                        placeholder=f"Type a prompt (up to {max_prompt_tokens} tokens); instruct "
                                                    "members get it inside their chat template.")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=2):
                    max_new = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="Top-p")
                    greedy = gr.Checkbox(value=False, label="Greedy (ignore temperature and top-p)",
                                         elem_id="greedy")
            columns, outputs, stats = [], [], []
            with gr.Row(equal_height=True):
                for i, m in enumerate(family.members):
                    with gr.Column(visible=m.name in default, min_width=220) as col:
                        outputs.append(gr.Textbox(label=m.label, lines=12, max_lines=30, interactive=False,
                                                  elem_id=f"output-{i}", elem_classes=["member-output"]))
                        stats.append(gr.Markdown("", elem_id=f"stats-{i}"))
                    columns.append(col)

        with gr.Tab("Evaluation", id="evaluation"):
            headers, rows = eval_table(family)
            if rows:
                gr.Markdown("Each member's evaluation; perplexity: lower is better.")
                gr.Dataframe(value=rows, headers=headers, interactive=False, elem_id="eval-table")
            else:
                gr.Markdown("**No evaluation results** in this family: run `hf-minitron eval` on the members "
                            "(or the build's evaluate stage), or add `results` / members' `eval` to the family "
                            "file.", elem_id="eval-missing")
            if family.plot and family.plot.is_file():
                from PIL import Image

                gr.Image(value=Image.open(family.plot).convert("RGB"), type="pil", label="quality vs parameters",
                         interactive=False, elem_id="eval-plot")
            else:
                gr.Markdown("**No family plot** (`family.png`, quality vs parameters) in this family.",
                            elem_id="plot-missing")

        def show(selected):
            return [gr.update(visible=m.name in (selected or [])) for m in family.members]

        picked.change(show, picked, columns, api_visibility="private")

        stops: dict[str, threading.Event] = {}  # per browser session: Stop ends that session's generation only

        def on_run(selected, text, n, temp, p, greedy_, request: gr.Request):
            blank = [gr.update() for _ in family.members]
            if not (text or "").strip():
                gr.Warning("Type a prompt first.")
                yield blank + blank
                return
            if not selected:
                gr.Warning("Pick at least one member.")
                yield blank + blank
                return
            settings = Settings(max_new_tokens=int(n), temperature=float(temp), top_p=float(p), greedy=bool(greedy_),
                                max_prompt_tokens=max_prompt_tokens)
            stop_event = stops[request.session_hash] = threading.Event()
            try:
                for states in compare(family, cache, text, list(selected), settings, stop=stop_event):
                    yield ([states[m.name].text if m.name in states else gr.update() for m in family.members] +
                           [states[m.name].stats() if m.name in states else gr.update() for m in family.members])
            finally:  # also when the page goes away mid-stream: the workers stop at their next token
                stop_event.set()
                if stops.get(request.session_hash) is stop_event:
                    del stops[request.session_hash]

        def on_stop(request: gr.Request):
            if request.session_hash in stops:
                stops[request.session_hash].set()

        # Gradio passes the request to a parameter annotated gr.Request; with postponed annotations that name only
        # resolves in this function, so give it the class itself
        on_run.__annotations__["request"] = on_stop.__annotations__["request"] = gr.Request
        inputs = [picked, prompt, max_new, temperature, top_p, greedy]
        limit = {"concurrency_limit": concurrency_limit, "concurrency_id": "generate"}  # one limit for both
        run.click(on_run, inputs, outputs + stats, api_name="generate", show_progress="minimal", **limit)
        prompt.submit(on_run, inputs, outputs + stats, api_visibility="private", show_progress="minimal", **limit)
        stop.click(on_stop, None, None, queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_SIZE)
    return demo


def make_demo(path: str | Path | None = None, cache: ModelCache | None = None):
    """The app for a family file (default: `default_family_file()`); a readable page when there is none."""
    path = path or default_family_file()
    try:
        if path is None:
            raise FamilyError("no family file found.")
        return build_app(load_family(path), cache)
    except (FamilyError, OSError, json.JSONDecodeError) as e:
        return build_app(None, error=str(e))


def launch(demo, **kwargs):
    """`demo.launch` with the app's look (Gradio 6 takes theme and CSS at launch, not in Blocks)."""
    return demo.launch(css=CSS, **kwargs)


def __getattr__(name):  # `gradio app.py` (reload mode) looks for a module-level `demo`; build it only then
    if name == "demo":
        globals()["demo"] = make_demo()
        return globals()["demo"]
    raise AttributeError(name)


if __name__ == "__main__":
    launch(make_demo())  # on a Space, GRADIO_SERVER_NAME/PORT come from the environment
