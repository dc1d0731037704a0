"""Publishing against a local Hub-protocol server: push a tiny member, load it back by repo id through the same
endpoint with plain `from_pretrained`, publish again without a new commit, recover from a failure part-way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from hf_minitron.publish import (PublishConfig, PublishError, files_to_publish, find_members, publish_family,
                                  publish_member, publish_run)

TEACHER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOAD_BACK = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], revision=sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[1], revision=sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=torch.arange(10)[None] % model.config.vocab_size).logits
torch.save({"logits": logits, "eos": tok.eos_token}, sys.argv[3])
"""


def make_member(folder, tokenizer, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pruning.json").write_text(json.dumps({"teacher": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                                    "target": {"ffn_size": 96}, "kept_layers": [0, 1, 2, 3],
                                                    "teacher_parameters": 200_000, "student_parameters": 141_632}))
    (folder / "eval_results.json").write_text(json.dumps({"model": folder.name, "parameters": 141_632,
                                                          "perplexity": [], "tasks": {}}))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (folder / "training_args.bin").write_bytes(b"x")
    return model


def test_publish_load_back_and_republish(hub, tmp_path, smollm2_tokenizer):
    folder = tmp_path / "tiny-member"
    model = make_member(folder, smollm2_tokenizer)
    plot = tmp_path / "family.png"
    plot.write_bytes(b"\x89PNG fake")

    config = PublishConfig(endpoint=hub.url, extra_files=[str(plot)], license="apache-2.0")
    report = publish_member(folder, "org/tiny-member", config)
    assert report.ok and report.commit and not report.unchanged
    pushed = set(report.uploaded)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "eval_results.json", "family.png",
            "pruning.json", "generation_config.json"} <= pushed
    assert "training_args.bin" not in pushed and not any(p.startswith("checkpoint") for p in pushed)
    snapshot = hub.state.repos["org/tiny-member"].snapshots[report.commit]
    assert b"org/tiny-member" in snapshot["README.md"]  # card rendered for this repo id
    assert b"![quality vs parameters across the family](family.png)" in snapshot["README.md"]
    assert b"hf_test_token_not_real" not in b"".join(snapshot.values())

    # load back by repo id through the same endpoint, in a fresh process with an empty cache
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", LOAD_BACK, "org/tiny-member", "main", str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(out)
    with torch.no_grad():
        expected = model(input_ids=torch.arange(10)[None] % model.config.vocab_size).logits
    torch.testing.assert_close(loaded["logits"], expected)
    assert loaded["eos"] == smollm2_tokenizer.eos_token

    # publishing again: nothing uploaded, no new commit
    commits = len(hub.state.commits)
    again = publish_member(folder, "org/tiny-member", config)
    assert again.uploaded == [] and again.commit == report.commit and len(hub.state.commits) == commits
    assert "up to date" in again.line()

    # one changed file: only it is uploaded
    (folder / "eval_results.json").write_text(json.dumps({"model": "x", "parameters": 1, "perplexity": [],
                                                          "tasks": {}}))
    third = publish_member(folder, "org/tiny-member", PublishConfig(endpoint=hub.url, extra_files=[str(plot)],
                                                                    card=False))
    assert third.uploaded == ["eval_results.json"] and hub.state.commits[-1]["paths"] == ["eval_results.json"]


def test_branch_and_pull_request(hub, tmp_path, smollm2_tokenizer):
    folder = tmp_path / "m"
    make_member(folder, smollm2_tokenizer)
    on_branch = publish_member(folder, "org/m", PublishConfig(endpoint=hub.url, revision="v1"))
    repo = hub.state.repos["org/m"]
    assert repo.refs["v1"] == on_branch.commit and "model.safetensors" not in repo.snapshots[repo.refs["main"]]
    pr = publish_member(folder, "org/m", PublishConfig(endpoint=hub.url, create_pr=True))
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1") and "refs/pr/1" in repo.refs
    assert "model.safetensors" not in repo.snapshots[repo.refs["main"]]  # main untouched until the PR is merged


def test_family_failure_part_way_then_rerun(hub, tmp_path, smollm2_tokenizer):
    run = tmp_path / "run"
    folders = []
    for i, name in enumerate(["big", "small"]):
        folder = run / name
        make_member(folder, smollm2_tokenizer, seed=i)
        folders.append(folder)
    assert find_members(run) == folders and find_members(folders[0]) == [folders[0]]

    config = PublishConfig(org="org", endpoint=hub.url, collection="tiny family")
    hub.state.fail_commits.add("org/small")
    with pytest.raises(PublishError) as failure:
        publish_family(folders, config)
    report = failure.value.report
    assert [m.ok for m in report.members] == [True, False]
    text = str(failure.value)
    assert "pushed      org/big" in text and "NOT pushed  org/small" in text and "run it again" in text
    assert "hf_test_token_not_real" not in text

    hub.state.fail_commits.clear()
    commits = len(hub.state.commits)
    done = publish_family(folders, config)
    assert done.ok and done.members[0].uploaded == [] and done.members[1].uploaded
    assert [c["repo"] for c in hub.state.commits[commits:]] == ["org/small"]  # only the missing member
    items = [i["id"] for i in hub.state.collections[done.collection]["items"]]
    assert items == ["org/big", "org/small"]


def test_publish_errors(tmp_path, smollm2_tokenizer):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        files_to_publish(tmp_path)
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        files_to_publish(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_members(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no member folders"):
        find_members(tmp_path / "empty")


def test_publish_cli(hub, tmp_path, smollm2_tokenizer, capsys):
    from hf_minitron.cli import main

    run = tmp_path / "run"
    for i, name in enumerate(["a", "b"]):
        make_member(run / name, smollm2_tokenizer, seed=i)
    code = main(["publish", str(run), "--org", "me", "--endpoint", hub.url, "--collection", "fam",
                 "--license", "apache-2.0"])
    assert code == 0
    assert "pushed      me/a" in capsys.readouterr().out
    assert set(hub.state.repos) == {"me/a", "me/b"}
    readme = hub.state.repos["me/a"].snapshots[hub.state.repos["me/a"].refs["main"]]["README.md"].decode()
    assert "license: apache-2.0" in readme
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in readme


def test_publish_cli_failure_exits_1_and_says_what_was_not_pushed(hub, tmp_path, smollm2_tokenizer, capsys):
    from hf_minitron.cli import main

    make_member(tmp_path / "a", smollm2_tokenizer)
    hub.state.fail_commits.add("me/x")
    code = main(["publish", str(tmp_path / "a"), "--org", "me", "--name", "x", "--endpoint", hub.url])
    assert code == 1
    out = capsys.readouterr()
    assert "NOT pushed  me/x" in out.out + out.err


def test_publish_run_with_space(hub, tmp_path, smollm2_tokenizer, capsys):
    """Members, then the comparison Space pointing at them; publishing again changes nothing."""
    from hf_minitron.cli import main
    from hf_minitron.report import write_family_report

    run = tmp_path / "run"
    for i, name in enumerate(["a", "b"]):
        make_member(run / name, smollm2_tokenizer, seed=i)
    results = [{"model": n, "parameters": p, "perplexity": [{"data": "text", "perplexity": q}], "tasks": {}}
               for n, p, q in [("a", 200_000, 12.0), ("b", 141_632, 15.0)]]
    write_family_report(results, run / "family", "tiny family")
    assert main(["publish", str(run), "--org", "me", "--endpoint", hub.url, "--space", "tiny-compare"]) == 0
    out = capsys.readouterr().out
    assert "Space me/tiny-compare" in out and "NOT pushed" not in out
    space = hub.state.repos["spaces/me/tiny-compare"]
    files = space.snapshots[space.refs["main"]]
    assert {"app.py", "requirements.txt", "README.md", "family.json", "family.png"} <= set(files)
    assert "sdk: gradio" in files["README.md"].decode()
    family = json.loads(files["family.json"])
    assert sorted(m["model"] for m in family["members"]) == ["me/a", "me/b"]  # Hub ids, not this machine's paths
    member = hub.state.repos["me/a"].snapshots[hub.state.repos["me/a"].refs["main"]]
    assert "family.png" in member and "![quality vs parameters" in member["README.md"].decode()

    commits = len(hub.state.commits)
    again = publish_run(run, PublishConfig(org="me", endpoint=hub.url, space="tiny-compare"))
    assert again.ok and again.space.uploaded == [] and len(hub.state.commits) == commits

    hub.state.fail_commits.add("spaces/me/broken")
    with pytest.raises(PublishError, match="NOT pushed  Space me/broken"):
        publish_run(run, PublishConfig(org="me", endpoint=hub.url, space="broken"))


def test_published_files_hold_no_local_paths(hub, tmp_path, smollm2_tokenizer):
    """Metadata, card, recipe and the Space's family file go up with run-relative paths, the teacher's Hub id for its
    local copy and bare names elsewhere; the local files keep their paths."""
    from pathlib import Path

    from helpers import distill_record, pruning_record

    from hf_minitron.report import write_family_report

    run, home = tmp_path / "run", Path.home()
    teacher = str(home / "models" / "teacher.gguf")
    for i, name in enumerate(["a", "b"]):
        folder = run / name
        make_member(folder, smollm2_tokenizer, seed=i)
        (folder / "pruning.json").write_text(json.dumps({**pruning_record(teacher),
                                                        "importance": str(run / "importance" / "teacher")}))
        (folder / "distill_result.json").write_text(json.dumps({**distill_record(teacher),
                                                                "out": str(run / "work" / name / "checkpoint-pruned")}))
        (folder / "eval_results.json").write_text(json.dumps({
            "model": name, "parameters": 141_632, "tasks": {},
            "perplexity": [{"data": str(home / "data" / "wiki.txt"), "seq_len": 64, "perplexity": 12.0 + i}]}))
    write_family_report([json.loads((run / n / "eval_results.json").read_text()) for n in "ab"], run / "family", "f")
    recipe = f"teacher:\n  source: {teacher}\ndata:\n  calibration: {home}/data/calibration.jsonl\n"
    publish_run(run, PublishConfig(org="me", endpoint=hub.url, space="cmp", base_model=TEACHER_ID),
                card_fields={"teacher": teacher, "recipe": recipe})

    local = [str(run), str(run.resolve()), f"{home}/"]
    for repo_id, repo in hub.state.repos.items():
        for path, content in repo.snapshots[repo.refs["main"]].items():
            assert not any(p.encode() in content for p in local), f"{repo_id}/{path} holds a local path"
    a = hub.state.repos["me/a"].snapshots[hub.state.repos["me/a"].refs["main"]]
    assert json.loads(a["pruning.json"])["teacher"]["source"] == TEACHER_ID
    assert json.loads(a["pruning.json"])["importance"] == "importance/teacher"
    assert json.loads(a["distill_result.json"])["out"] == "work/a/checkpoint-pruned"
    assert json.loads(a["eval_results.json"])["perplexity"][0]["data"] == "wiki.txt"
    assert "calibration: calibration.jsonl" in a["README.md"].decode()
    assert json.loads((run / "a" / "pruning.json").read_text())["teacher"]["source"] == teacher  # local: as it was


def test_publishing_a_family_needs_an_org(tmp_path):
    with pytest.raises(ValueError, match="publish.org is not set"):
        publish_family([tmp_path], PublishConfig())
