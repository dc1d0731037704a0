"""The Minitron paper's findings, reproduced at laptop scale: one resumable command.

    python bench/paper/run.py                       # every experiment, SmolLM2-135M teacher, this machine
    python bench/paper/run.py --only heads,kd_vs_ce # some of them
    python bench/paper/run.py --quick               # smaller calibration and budgets (minutes, not hours)
    python bench/paper/run.py --teacher ORG/NAME --device cuda   # another teacher, on a GPU
    python bench/paper/run.py --only kd_vs_ce --hellaswag 1000   # with 0-shot HellaSwag on 1,000 tasks per arm
    python bench/paper/run.py --only kd_vs_ce --train-on pydoc   # the reverse split: train on pydoc, not WikiText-2
    python bench/paper/run.py --render              # only rewrite README.md from results.json

Each experiment writes its arms into `results.json` as they finish (a rerun skips the finished ones while the
settings are the same), then a verdict: reproduced, not reproduced (with the measured cause) or inconclusive (why).
`README.md` is rendered from `results.json`: the paper's finding, our figures, a plot and the verdict per experiment,
with the machine, commit and command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_aggregation  # noqa: E402
import exp_chain  # noqa: E402
import exp_heads  # noqa: E402
import exp_kd  # noqa: E402
import exp_losses  # noqa: E402
import exp_search  # noqa: E402
import exp_width_depth  # noqa: E402
from common import DATA_DIR, HERE, TEACHER, TRAIN_ON, Suite, record_key  # noqa: E402

EXPERIMENTS = {m.NAME: m for m in (exp_aggregation, exp_heads, exp_width_depth, exp_kd, exp_chain, exp_losses,
                                    exp_search)}


REVERSE = "pydoc"  # the reverse split's training text (`--train-on pydoc`); its records sit beside the default's


def render(suite: Suite) -> Path:
    """README.md from results.json: per experiment the finding, figures, plot and verdict, then the reverse split's
    where it was run."""
    results = suite.results()["experiments"]
    for name, module in EXPERIMENTS.items():  # verdicts from the arms, by the current rules
        for key in (name, record_key(name, REVERSE)):
            if "verdict" in results.get(key, {}):
                results[key].update(module.verdict(results[key]))
    lines = ["# The paper's findings at laptop scale (`bench/paper/`)", "",
             "Rendered by `python bench/paper/run.py` from `results.json`; every figure below was measured by it.",
             "Held-out text: WikiText-2 test and CPython's language reference (`pydoc-topics`); calibration and "
             "training read tiny-shakespeare + WikiText-2 valid, so no arm trains on either text, but WikiText-2 "
             "test shares the training text's distribution and pydoc does not. The reverse split (`--train-on "
             "pydoc`, where run) trains on tiny-shakespeare + pydoc less its last 15% of documents and evaluates on "
             "those documents and WikiText-2 test, so the two texts swap roles. Arms are compared window by window "
             "(mean per-window log-perplexity difference +- its standard error) and, where HellaSwag was measured "
             "(`--hellaswag 1000`), task by task (acc_norm difference +- its paired standard error; out of the "
             "training distribution, like the held-out text); a difference within 2 standard errors is "
             "inconclusive.", "",
             "| experiment | verdict | reverse split |", "|---|---|---|"]
    for name, module in EXPERIMENTS.items():
        rec, rev = results.get(name), results.get(record_key(name, REVERSE))
        lines.append(f"| [{module.TITLE}](#{name}) | {rec.get('verdict', 'not run') if rec else 'not run'} | "
                     f"{rev.get('verdict', 'not run') if rev else 'not run'} |")
    for name, module in EXPERIMENTS.items():
        rec, rev = results.get(name), results.get(record_key(name, REVERSE))
        lines += ["", f"## {module.TITLE}", f'<a id="{name}"></a>', "", f"**The paper:** {module.FINDING}", ""]
        if not rec or "verdict" not in rec:
            lines.append("Not run yet: `python bench/paper/run.py --only " + name + "`.")
        else:
            lines += record_lines(suite, module, rec, f"{name}.png")
        if rev and "verdict" in rev:
            lines += ["", f"### Reverse split: trained on tiny-shakespeare + {TRAIN_ON[REVERSE]}", ""]
            lines += record_lines(suite, module, rev, f"{name}-reverse.png")
    path = suite.out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def record_lines(suite: Suite, module, rec: dict, png: str) -> list[str]:
    """One record's verdict, protocol, arms table, plot and provenance."""
    m = rec["machine"]
    lines = [f"**Verdict: {rec['verdict']}.** {rec['why']}", "",
             f"Protocol: {', '.join(f'{k}: {v}' for k, v in rec.get('protocol', {}).items())}; "
             f"evaluation {rec['settings']['eval_windows']} x {rec['settings']['eval_len']} tokens per text, "
             f"seed {rec['settings']['seed']}, teacher `{rec['settings']['teacher']}`.", "",
             "| arm | params | WikiText-2 ppl | pydoc ppl | HellaSwag acc_norm | wall |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm, a in rec["arms"].items():
        hs = a.get("hellaswag")
        hs = f"{hs['acc_norm']:.3f} +- {hs['se']:.3f} (n {hs['n']})" if hs else "-"
        ppl = [f"{a['eval'][t]['ppl']:.2f}" if "eval" in a else "-" for t in ("wikitext2", "pydoc")]
        params = f"{a['params'] / 1e6:.1f}M" if "params" in a else "-"
        lines.append(f"| {arm} | {params} | {ppl[0]} | {ppl[1]} | {hs} | {a.get('wall_s', 0):.0f} s |")
    if any("eval" not in a for a in rec["arms"].values()):  # arms that are not one model (a search)
        lines += [""] + [f"- {f}" for f in rec.get("figures", [])]
    module.plot(rec, suite.out / png)
    return lines + ["", f"![{png[:-4]}]({png})", "",
                    f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; torch {m['torch']}, "
                    f"transformers {m['transformers']}; commit {m['commit']}; `{m['command']}`."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma list of experiments: {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--teacher", default=TEACHER, help=f"teacher model spec (default: {TEACHER})")
    p.add_argument("--data-dir", default=DATA_DIR, help="folder of the shared text files")
    p.add_argument("--out", default=str(HERE), help="where results.json, README.md and the plots go")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per text (default: 8)")
    p.add_argument("--eval-len", type=int, default=512, help="tokens per held-out window (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration and training seed of every arm (default: 0)")
    p.add_argument("--quick", action="store_true", help="smaller calibration and training budgets")
    p.add_argument("--kd-tokens", type=int, default=None,
                   help="training tokens per trained arm (default: 32768; 8192 with --quick)")
    p.add_argument("--hellaswag", type=int, default=0,
                   help="0-shot HellaSwag tasks per arm from the shared dev file (1000: SE ~0.015; default: none)")
    p.add_argument("--device", default="cpu", help="where the teacher and the pruned models run (default: cpu)")
    p.add_argument("--train-on", choices=list(TRAIN_ON), default="wikitext2",
                   help="the text trained and calibrated on beside tiny-shakespeare: "
                        + "; ".join(f"{k}: {v}" for k, v in TRAIN_ON.items())
                        + " (the reverse split: pydoc's held-out documents and WikiText-2 test are evaluated, and "
                          "WikiText-2 is the text out of the training distribution; kept beside the default's "
                          "records). Default: wikitext2")
    p.add_argument("--render", action="store_true", help="only render README.md from results.json")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    suite = Suite(args.teacher, args.data_dir, Path(args.out), args.eval_windows, args.eval_len, args.seed,
                  args.quick, args.kd_tokens, args.device, args.hellaswag, args.train_on)
    if not args.render:
        for name in names:
            print(f"== {name}: {EXPERIMENTS[name].TITLE}", flush=True)
            t0 = time.perf_counter()
            rec = EXPERIMENTS[name].run(suite)
            print(f"== {name}: {rec['verdict']} ({time.perf_counter() - t0:.0f} s): {rec['why']}", flush=True)
    print(f"rendered {render(suite)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
