"""The family build end to end on a tiny random teacher: chain, SFT variant, skip/force, kill and resume, CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import teacher_and_corpus

from hf_minitron.cli import main
from hf_minitron.pipeline import build
from hf_minitron.publish import PublishError
from hf_minitron.recipe import from_dict
from hf_minitron.rundir import MemberRecord, StaleStageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama teacher with the SmolLM2 tokenizer, a text corpus and a chat data set."""
    root = teacher_and_corpus(tmp_path_factory.mktemp("family"), smollm2_tokenizer)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"dialog": [{"role": "user", "content": f"What is {i} + {i}?"},
                                           {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n")
    return root


def tiny_recipe(files, **sections) -> dict:
    corpus = str(files / "corpus.jsonl")
    raw = {
        "name": "tiny", "teacher": {"source": str(files / "teacher")},
        "data": {"calibration": corpus, "distillation": corpus, "holdout": 0.2,
                 "sft": {"path": str(files / "chat.jsonl"), "text_column": "dialog"}},  # the build honours the column
        "importance": {"samples": 4, "seq_len": 32, "depth_ppl_samples": 0},
        "prune": {"depth_metric": "bi"},
        "members": [{"name": "small", "params": 2_950_000},
                    {"name": "smaller", "parent": "small", "shape": {"ffn_size": 64}, "instruct": True}],
        "search": {"tolerance": 0.1, "multiple": 8, "max_candidates": 2, "tokens": 64, "seq_len": 32,
                   "batch_size": 2, "eval_windows": 2, "eval_seq_len": 32, "lora_r": 4, "lora_alpha": 8,
                   "adapter": "merge"},
        "distill": {"tokens": 256, "max_length": 32, "per_device_train_batch_size": 2, "save_steps": 2,
                    "logging_steps": 1},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "lora_r": 4},
        "evaluate": {"seq_len": 32, "windows": 2},
        "cost": {"scratch_tokens": "1B"},
    }
    raw.update(sections)
    return raw


def actions(result) -> dict:
    return dict(result["actions"])


def test_chain_with_instruct_variant_then_skip_force_and_stale(files, tmp_path, shared_data):
    out, lines = tmp_path / "run", []
    tasks = {"seq_len": 32, "windows": 2, "choice_files": [str(shared_data / "hellaswag_val_dev.jsonl")], "limit": 2}
    result = build(from_dict(tiny_recipe(files, evaluate=tasks)), out, progress=False, log=lines.append)
    assert set(actions(result).values()) == {"run"}
    tok = AutoTokenizer.from_pretrained(out / "smaller-instruct")
    for name in ("small", "smaller", "smaller-instruct"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        ids = model.generate(**tok("def f(x):", return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert ids.shape[1] > 4
        evaluated = json.loads((out / name / "eval_results.json").read_text())
        assert evaluated["perplexity"][0]["perplexity"] > 1
        assert "acc_norm" in evaluated["tasks"]["local_hellaswag_val_dev"]["metrics"]  # the recipe's tasks ran
    small = AutoModelForCausalLM.from_pretrained(out / "small").config
    smaller = AutoModelForCausalLM.from_pretrained(out / "smaller").config
    assert smaller.intermediate_size == 64 and smaller.hidden_size == small.hidden_size < 64  # pruned from small
    assert json.loads((out / "smaller" / "pruning.json").read_text())["base"] == "small"
    assert json.loads((out / "small" / "search.json").read_text())["winner"]["rank"] == 1
    instruct = MemberRecord.read(out / "smaller-instruct")
    assert (instruct.kind, instruct.sft_from, instruct.pruned_from) == ("instruct", "smaller", None)
    smaller_record = MemberRecord.read(out / "smaller")
    assert (smaller_record.pruned_from, smaller_record.distilled_from) == ("small", "small")
    assert (out / "smaller-instruct" / "pruning.json").is_file()  # the instruct card shows its base's pruning
    assert not list(out.glob("*/checkpoint-[0-9]*"))  # checkpoints dropped once a member is finished
    cost = json.loads((out / "manifest.json").read_text())["cost"]
    s, t = cost["members"]["small"], cost["members"]["smaller"]
    assert s["tokens"] == {"search": 128, "distillation": 256}
    assert t["tokens"] == {"calibration": 128, "distillation": 256, "sft": t["tokens"]["sft"]}
    assert t["tokens"]["sft"] > 0
    assert t["lineage_tokens"] == s["total_tokens"] + t["total_tokens"]
    assert cost["build_tokens"] == 128 + s["total_tokens"] + t["total_tokens"]
    assert cost["fewer_tokens"] == round(2e9 / cost["build_tokens"], 1) and s["flops"] > 0
    assert any("fewer tokens" in line for line in lines) and any("| rank |" in line for line in lines)
    table = (out / "family" / "family.md").read_text()
    assert all(f"| {name} |" in table for name in ("teacher", "small", "smaller", "smaller-instruct"))
    assert (out / "family" / "family.png").stat().st_size > 1000
    card = (out / "smaller" / "README.md").read_text()
    assert "hf-minitron" in card and "](family.png)" in card and (out / "smaller" / "family.png").is_file()
    assert (out / "family" / "recovery.png").is_file() and "](recovery.png)" in card  # the KD loss against tokens

    again = build(from_dict(tiny_recipe(files, evaluate=tasks)), out, progress=False, log=lines.append)
    assert set(actions(again).values()) == {"skipped"}

    forced = actions(build(from_dict(tiny_recipe(files, evaluate=tasks)), out, force=["smaller:distill"],
                           progress=False,
                           log=lines.append))
    # distillation is seeded: the same weights again (same hash), so the SFT has nothing to redo; the evaluation
    # results went with the member folder, so they are made again
    assert forced["smaller/distill"] == forced["smaller/evaluate"] == "redo" and forced["smaller/sft"] == "skipped"
    assert (out / "smaller" / "eval_results.json").is_file()
    assert forced["small/distill"] == forced["small/search"] == "skipped"
    reseeded = tiny_recipe(files, evaluate=tasks, distill=dict(tiny_recipe(files)["distill"], seed=7))
    forced = actions(build(from_dict(reseeded), out,
                           force=["distill"], progress=False, log=lines.append))
    assert forced["small/distill"] == forced["smaller/prune"] == forced["smaller/sft"] == "redo"  # new weights

    changed = tiny_recipe(files, evaluate=tasks)
    changed["distill"]["tokens"] = 512
    with pytest.raises(StaleStageError, match=r"small/distill finished with other settings \(.*tokens changed\)"):
        build(from_dict(changed), out, progress=False, log=lines.append)


def test_build_publishes_members_and_space_and_completes_a_failed_publish(files, tmp_path, hub):
    members = [{"name": "a", "shape": {"ffn_size": 96}}, {"name": "b", "parent": "a", "shape": {"ffn_size": 64}}]
    raw = tiny_recipe(files, members=members, publish={"org": "fam", "space": "fam-compare", "collection": "tiny"})
    out, lines = tmp_path / "run", []
    hub.state.fail_commits.add("fam/b")
    with pytest.raises(PublishError, match="NOT pushed  fam/b"):
        build(from_dict(raw), out, progress=False, log=lines.append)
    assert json.loads((out / "manifest.json").read_text())["stages"]["publish"]["status"] == "running"
    space = hub.state.repos["spaces/fam/fam-compare"]
    assert [m["model"] for m in json.loads(space.snapshots[space.refs["main"]]["family.json"])["members"]] == ["fam/a"]

    hub.state.fail_commits.clear()
    commits = len(hub.state.commits)
    done = actions(build(from_dict(raw), out, progress=False, log=lines.append))
    assert done["publish"] == "resume" and done["b/distill"] == "skipped"
    assert sorted(c["repo"] for c in hub.state.commits[commits:]) == ["fam/b", "spaces/fam/fam-compare"]
    files_b = hub.state.repos["fam/b"].snapshots[hub.state.repos["fam/b"].refs["main"]]
    assert {"model.safetensors", "config.json", "README.md", "family.png", "eval_results.json"} <= set(files_b)
    assert "base_model" not in files_b["README.md"].decode().split("---")[1]  # a local teacher is no Hub base
    assert [i["id"] for i in hub.state.collections[next(iter(hub.state.collections))]["items"]] == ["fam/a", "fam/b"]
    assert actions(build(from_dict(raw), out, progress=False, log=lines.append))["publish"] == "skipped"


DRIVER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from hf_minitron import distill
    from hf_minitron.cli import main

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went away right after a checkpoint

    init = distill.MinitronDistillTrainer.__init__
    def patched(self, *a, **kw):
        init(self, *a, **kw)
        if self.args.save_strategy != "no":  # the distillation stage, not the search's LoRA retraining
            self.add_callback(Kill())
    distill.MinitronDistillTrainer.__init__ = patched
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_distillation_then_resume_skips_every_earlier_stage(files, tmp_path):
    raw = tiny_recipe(files, members=[{"name": "small", "params": 2_950_000}])
    raw["search"]["max_candidates"] = 1
    raw["distill"]["tokens"] = 384  # 6 steps; checkpoints every 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), "build", "--recipe", str(tmp_path / "r.yaml"),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["small/distill"]["status"] == "running"
    assert (out / "small" / "checkpoint-2").is_dir() and not (out / "small" / "config.json").exists()

    result = build(from_dict(yaml.safe_load((tmp_path / "r.yaml").read_text())), out, progress=False, log=print)
    done = actions(result)
    assert done["importance/teacher"] == done["small/search"] == done["small/prune"] == "skipped"
    assert done["teacher/evaluate"] == "skipped" and done["small/distill"] == "resume"
    history = json.loads((out / "small" / "distill_result.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-2 restored from checkpoint-2's state, 3-6 trained after the resume
    reloaded = AutoModelForCausalLM.from_pretrained(out / "small")
    assert reloaded.num_parameters() == result["members"]["small"]["parameters"]


def test_cli_build_dry_run(capsys):
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "llama-3.1-minitron-4b-width.yaml")
    assert main(["build", "--recipe", recipe, "--dry-run", "distill.tokens=1B", "--force", "distill"]) == 0
    out = capsys.readouterr().out  # the plan: the member's shape and parameters
    assert "3072/9216/32/8/32" in out and "4.51B" in out


def test_cli_build_names_a_mistyped_key(capsys):
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "llama-3.1-minitron-4b-width.yaml")
    assert main(["build", "--recipe", recipe, "--dry-run", "distill.tokenz=1"]) == 2
    assert "unknown key 'distill.tokenz'" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_builds_a_real_family(tmp_path, smollm2_path):
    """recipes/quickstart.yaml as shipped: ~100M and ~70M members from SmolLM2-135M, offline (~15 min on 2 cores)."""
    from hf_minitron.recipe import load_recipe

    recipe = load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml"))
    result = build(recipe, tmp_path / "run", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "smollm2-70m")
    for name, budget in (("smollm2-100m", 100e6), ("smollm2-70m", 70e6)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / name)
        assert abs(model.num_parameters() / budget - 1) <= 0.05
        ids = model.generate(**tok("The for statement", return_tensors="pt"), max_new_tokens=8, do_sample=False)
        assert len(tok.decode(ids[0])) > len("The for statement")
    assert result["fewer_tokens"] > 1000
    ppl = {name: json.loads((tmp_path / "run" / where).read_text())["perplexity"][0]["perplexity"]
           for name, where in (("teacher", "eval/teacher.json"), ("smollm2-100m", "smollm2-100m/eval_results.json"),
                               ("smollm2-70m", "smollm2-70m/eval_results.json"))}
    assert ppl["smollm2-100m"] <= 1.25 * ppl["teacher"] and ppl["smollm2-70m"] <= 2.0 * ppl["teacher"], ppl  # issue 12
    greedy = json.loads((tmp_path / "run" / "smollm2-70m" / "eval_results.json").read_text())["greedy"]
    loops = [(g["prompt"], g["loop"]) for g in greedy if g["loop"]]
    assert not loops, f"the smallest member's greedy continuations loop: {loops}"  # issue 12's goal


def test_a_second_build_on_a_busy_run_folder_stops_at_once(files, tmp_path):
    from hf_minitron.rundir import RunLockedError, lock_run

    out = tmp_path / "run"
    out.mkdir()
    holder = lock_run(out)
    try:
        with pytest.raises(RunLockedError, match="is in use by PID"):
            build(from_dict(tiny_recipe(files)), out, progress=False, log=lambda _: None)
    finally:
        holder.close()
    assert not (out / "manifest.json").exists()  # nothing was touched


def test_teacher_correction_runs_first_and_feeds_importance_and_distillation(files, tmp_path):
    raw = tiny_recipe(files, members=[{"name": "small", "shape": {"ffn_size": 64}}],
                      teacher_correction={"tokens": 128, "max_length": 32, "per_device_train_batch_size": 2})
    out, lines = tmp_path / "run", []
    result = build(from_dict(raw), out, progress=False, log=lines.append)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    corrected = stages["teacher/correction"]["outputs"]["sha256"]
    assert stages["importance/teacher"]["inputs"]["parents"]["model"] == corrected
    assert stages["small/distill"]["inputs"]["parents"]["kd_teacher"] == corrected
    assert next(i for i, line in enumerate(lines) if "teacher/correction" in line) < \
        next(i for i, line in enumerate(lines) if "importance/teacher" in line)
    assert actions(result)["teacher/correction"] == "run"
    again = build(from_dict(raw), out, progress=False, log=lines.append)
    assert set(actions(again).values()) == {"skipped"}


def test_a_members_distill_overrides_reach_its_distillation_only(files, tmp_path):
    raw = tiny_recipe(files, members=[{"name": "small", "shape": {"ffn_size": 96}},
                                      {"name": "smaller", "parent": "small", "shape": {"ffn_size": 64},
                                       "distill": {"unlikelihood": 1.0, "unlikelihood_tokens": 8,
                                                   "on_policy_prompt": 8}}])
    out = tmp_path / "run"
    build(from_dict(raw), out, progress=False)
    losses = {m: json.loads((out / m / "distill_result.json").read_text())["losses"] for m in ("small", "smaller")}
    assert losses["smaller"]["unlikelihood"] == 1.0 and losses["small"]["unlikelihood"] == 0.0
    history = json.loads((out / "smaller" / "distill_result.json").read_text())["log_history"]
    assert any("repeat_share" in h for h in history)  # the member's steps ran the unlikelihood loss


def test_teacher_cache_auto_feeds_the_search_and_the_distillation_and_counts_the_teacher_once(files, tmp_path,
                                                                                              monkeypatch):
    from hf_minitron import cached_distill, distill
    from hf_minitron.cost import train_flops

    def live(*args, **kwargs):
        raise AssertionError("a trainer with the live teacher")

    cached = []
    real_init = cached_distill.CachedDistillTrainer.__init__
    monkeypatch.setattr(distill.MinitronDistillTrainer, "__init__", live)
    monkeypatch.setattr(cached_distill.CachedDistillTrainer, "__init__",
                        lambda self, *a, **k: cached.append(1) or real_init(self, *a, **k))
    raw = tiny_recipe(files, members=[{"name": "small", "params": 2_950_000}])
    raw["distill"].update(teacher_cache="auto", teacher_cache_top_k=16)
    out = tmp_path / "run"
    build(from_dict(raw), out, progress=False, log=print)
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    record = stages["small/teacher-logits"]
    folder = out / "work" / "teacher-logits"
    (cache,) = folder.iterdir()
    meta = json.loads((cache / "teacher_cache.json").read_text())
    assert meta["complete"] and meta["top_k"] == 16 and meta["tokens"] == record["teacher_tokens"]
    teacher_params = AutoModelForCausalLM.from_pretrained(files / "teacher").num_parameters()
    assert record["flops"] == 2 * teacher_params * meta["tokens"]  # the teacher's forward passes, once
    assert len(cached) > 1  # the search's candidates (>= 1 segment each) and the distillation
    assert json.loads((out / "small" / "distill_result.json").read_text())["teacher_cache"] == str(cache)
    distilled = stages["small/distill"]
    assert distilled["flops"] == train_flops(distilled["parameters"], distilled["tokens"]["distillation"])
    again = build(from_dict(raw), out, progress=False, log=print)
    assert set(actions(again).values()) == {"skipped"}
