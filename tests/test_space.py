"""The comparison Space: family file from a run folder, streamed generation, and the app in a real headless Chromium.

The browser test needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`): it fails,
not skips, when they are missing. Its screenshots go to test-artifacts/space/ in the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import write_member_folder
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_minitron.rundir import MemberRecord
from hf_minitron.space import (SpaceError, app_dir, build_family, family_from_run, launch_space, load_app, member_entry,
                               teacher_entry, write_space_folder)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "space"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _member(folder: Path, tokenizer, hidden: int, layers: int, seed: int) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smollm2_tokenizer):
    """A run folder as a build leaves it: two members (the small one instruct), eval JSON each, and a family plot."""
    from hf_minitron.report import write_family_report

    run = tmp_path_factory.mktemp("run")
    big = _member(run / "members" / "tiny-big", smollm2_tokenizer, 64, 4, 0)
    small = _member(run / "members" / "tiny-small", smollm2_tokenizer, 32, 2, 1)
    (small / "sft_result.json").write_text("{}")
    records = []
    for folder, ppl, acc in ((big, 812.5, 0.31), (small, 1530.25, 0.27)):
        params = AutoModelForCausalLM.from_pretrained(folder).num_parameters()
        records.append({"model": folder.name, "parameters": params,
                        "perplexity": [{"data": "pydoc-topics", "seq_len": 64, "perplexity": ppl}],
                        "tasks": {"hellaswag_val_dev": {"metrics": {"acc": 0.25, "acc_norm": acc,
                                                                    "acc_stderr": 0.01}}}})
        (folder / "eval_results.json").write_text(json.dumps(records[-1]))
    write_family_report(records, run / "report", name="tiny family")  # family_results.json, family.png
    return run


@pytest.fixture(scope="module")
def app():
    return load_app()


# ---- the family file ----


def test_member_without_metadata(run_dir, tmp_path):
    shutil.copytree(run_dir / "members" / "tiny-big", tmp_path / "bare-instruct")
    (tmp_path / "bare-instruct" / "eval_results.json").unlink()
    entry = member_entry(tmp_path / "bare-instruct")
    assert entry["instruct"] and "eval" not in entry
    assert entry["params"] == AutoModelForCausalLM.from_pretrained(tmp_path / "bare-instruct").num_parameters()
    assert member_entry("org/Some-Model-Instruct") == {"name": "Some-Model-Instruct",
                                                        "model": "org/Some-Model-Instruct", "instruct": True}
    with pytest.raises(SpaceError, match="neither a member folder nor a Hub id"):
        member_entry(tmp_path / "nothing-here")


def test_member_entry_takes_instruct_from_the_member_record(tmp_path):
    folder = write_member_folder(tmp_path / "chat", MemberRecord("chat", "instruct", sft_from="base"))
    assert member_entry(folder)["instruct"], "kind instruct in member.json, whatever the folder's name"


def test_member_entry_record_overrides_the_folder_name(tmp_path):
    folder = write_member_folder(tmp_path / "base-instruct", MemberRecord("base-instruct", "base"))
    assert not member_entry(folder)["instruct"], "kind base in member.json"


def test_family_from_run(run_dir, app):
    family = family_from_run(run_dir)
    assert [m["name"] for m in family["members"]] == ["tiny-big", "tiny-small"]  # largest first
    big, small = family["members"]
    assert not big["instruct"] and small["instruct"]  # SFT result → instruct
    assert big["params"] > small["params"] and big["eval"]["perplexity"][0]["perplexity"] == 812.5
    assert family["plot"] == str((run_dir / "report" / "family.png").resolve())
    assert family["results"] == str((run_dir / "report" / "family_results.json").resolve())

    loaded = app.family_from_dict(family)
    headers, rows = app.eval_table(loaded)
    assert headers == ["model", "parameters", "size", "ppl pydoc-topics", "hellaswag_val_dev acc_norm"]
    assert [r[0] for r in rows] == ["tiny-big", "tiny-small"] and rows[0][2] == "100%"
    assert rows[1][3:] == [1530.25, 0.27]


def test_family_file_round_trip(run_dir, app, tmp_path):
    """A family file with relative paths and a results file; the members' own eval fills in what it lacks."""
    shutil.copytree(run_dir / "members", tmp_path / "members")
    (tmp_path / "family_results.json").write_text(json.dumps(
        [{"model": "teacher", "parameters": 10**6, "perplexity": [{"data": "pydoc-topics", "perplexity": 20.0}]}]))
    (tmp_path / "family.json").write_text(json.dumps({
        "name": "tiny family", "results": "family_results.json", "plot": "missing.png",
        "members": [{"name": "big", "model": "members/tiny-big", "params": 123},
                    {"model": "members/tiny-small", "instruct": True,
                     "eval": {"hellaswag acc_norm": 0.31}},
                    {"name": "hub", "model": "someone/some-model"}]}))
    family = app.load_family(tmp_path / "family.json")
    assert [m.name for m in family.members] == ["big", "tiny-small", "hub"]
    assert family.members[0].model == str((tmp_path / "members" / "tiny-big").resolve())
    assert family.members[2].model == "someone/some-model" and family.plot is None
    assert family.members[1].instruct and family.members[0].label == "big (123)"
    headers, rows = app.eval_table(family)
    assert [r[0] for r in rows] == ["teacher", "tiny-small"] and "hellaswag acc_norm" in headers

    # the launcher's view of the same file: paths made absolute, so the family can be written elsewhere
    built = build_family(tmp_path / "family.json")
    assert built["results"] == str((tmp_path / "family_results.json").resolve())
    assert app.family_from_dict(built, base="/").members[0].model == family.members[0].model


def test_a_teacher_given_as_a_model_is_the_first_column(run_dir, app):
    big = str(run_dir / "members" / "tiny-big")
    family = app.family_from_dict({"teacher": {"name": "teacher", "model": big, "source": "org/teacher"},
                                   "members": [str(run_dir / "members" / "tiny-small")]})
    assert [m.name for m in family.members] == ["teacher", "tiny-small"] and family.members[0].teacher
    assert family.teacher == "org/teacher" and not family.members[1].teacher


def test_teacher_entry_of_a_folder_a_gguf_a_hub_id_and_an_unloadable_spec(run_dir, tmp_path):
    record = {"model": "teacher", "parameters": 1234}
    folder = teacher_entry(str(run_dir / "members" / "tiny-big"), record)
    assert folder["model"] == str((run_dir / "members" / "tiny-big").resolve()) and folder["params"] == 1234
    (tmp_path / "t.gguf").write_bytes(b"GGUF")
    assert teacher_entry(str(tmp_path / "t.gguf")) == {"name": "teacher", "source": str(tmp_path / "t.gguf"),
                                                       "model": str(tmp_path), "gguf_file": "t.gguf"}
    assert teacher_entry("org/model")["model"] == "org/model"
    assert teacher_entry("./no/such/thing") is None


def test_family_from_run_gives_the_teacher_a_column(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "manifest.json").write_text(json.dumps({"teacher": {"source": str(run / "members" / "tiny-big")}}))
    family = family_from_run(run)
    assert family["teacher"]["name"] == "teacher" and family["teacher"]["model"].endswith("tiny-big")
    out = write_space_folder(run, tmp_path / "space", repo_ids={"tiny-big": "org/tiny-big",
                                                                "tiny-small": "org/tiny-small"})
    assert json.loads((out / "family.json").read_text())["teacher"] == str(run / "members" / "tiny-big")


@pytest.mark.parametrize("data, message", [
    ({"members": []}, "non-empty 'members'"),
    ({"members": [{"name": "a"}]}, "needs a 'model'"),
    ({"members": [{"model": "a/b", "colour": 1}]}, "unknown keys ['colour']"),
    ({"members": [{"model": "a/b"}, {"model": "c/b"}]}, "two members are named 'b'"),
])
def test_family_file_errors(app, data, message):
    with pytest.raises(app.FamilyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        app.family_from_dict(data)


def test_app_runs_without_hf_minitron(run_dir, tmp_path):
    """The Space has only requirements.txt: app.py must not need hf_minitron; the shipped example file loads."""
    import subprocess

    family = tmp_path / "family.json"
    family.write_text(json.dumps(family_from_run(run_dir)))
    code = (
        "import sys; sys.modules['hf_minitron'] = None\n"  # any import of it fails
        f"sys.path.insert(0, {str(app_dir())!r}); import app\n"
        "example = app.load_family(app.HERE / 'family.example.json')\n"
        "assert example.members[0].model == 'HuggingFaceTB/SmolLM2-135M-Instruct' and example.members[0].instruct\n"
        f"fam = app.load_family({str(family)!r})\n"
        "p = app.generate(*app.ModelCache('cpu').get(fam.members[1]), 'Hi', True, app.Settings(max_new_tokens=4))\n"
        "assert p.tokens == 4, p\n"
        f"assert 'tiny-small' in str(app.make_demo({str(family)!r}).config)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_missing_family_file_or_results_give_a_message(app, tmp_path):
    assert "does not exist" in json.dumps(app.make_demo(tmp_path / "nope.json").config)
    page = json.dumps(app.build_app(app.family_from_dict({"members": ["someone/model"]})).config)
    assert "No evaluation results" in page and "No family plot" in page


def test_browser_missing_fails_with_the_install_line(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", "/nonexistent/chromedriver")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        _browser()


def test_space_folder(run_dir, tmp_path):
    with pytest.raises(SpaceError, match="local folders"):
        write_space_folder(run_dir, tmp_path / "x")
    out = write_space_folder(run_dir, tmp_path / "space", repo_ids={"tiny-big": "org/tiny-big",
                                                                    "tiny-small": "org/tiny-small"})
    family = json.loads((out / "family.json").read_text())
    assert [m["model"] for m in family["members"]] == ["org/tiny-big", "org/tiny-small"]
    assert family["plot"] == "family.png" and (out / "family.png").is_file()
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(out / "README.md").data  # the Space front matter as the Hub reads it
    assert card.sdk == "gradio" and card.app_file == "app.py" and card.title
    assert {"gradio", "torch", "transformers"} <= {line.split(">")[0].split("=")[0].strip()
                                                   for line in (out / "requirements.txt").read_text().splitlines()}


# ---- generation ----


def test_generate_streams_with_timings(run_dir, app):
    family = app.family_from_dict(family_from_run(run_dir))
    cache = app.ModelCache("cpu")
    model, tokenizer = cache.get(family.member("tiny-big"))
    assert cache.get(family.member("tiny-big"))[0] is model  # loaded once

    states = [(p.text, p.tokens) for p in app.stream_generate(model, tokenizer, "The capital of France",
                                                              settings=app.Settings(max_new_tokens=12))]
    assert len(states) > 2 and states[-1][1] == 12 and states[-1][0].strip()
    assert all(a[1] <= b[1] for a, b in zip(states, states[1:]))  # token counts only grow

    greedy = app.Settings(max_new_tokens=8, greedy=True)
    first, second = (app.generate(model, tokenizer, "Once upon a time", settings=greedy) for _ in range(2))
    assert first.text == second.text and first.tokens == 8
    assert first.first_token_s > 0 and first.elapsed_s >= first.first_token_s and first.tokens_per_s > 0
    assert "tokens/s" in first.stats() and "latency" in first.stats()

    stop = threading.Event()
    stop.set()  # Stop pressed: generation ends at the next token, and says so
    stopped = app.generate(model, tokenizer, "Hi", settings=app.Settings(max_new_tokens=50), stop=stop)
    assert stopped.stopped and stopped.tokens <= 1 and "(stopped)" in stopped.stats()

    _, small_tok = cache.get(family.member("tiny-small"))
    chat = app.build_prompt(small_tok, "Hi", instruct=True)
    assert chat.startswith("<|im_start|>") and chat.rstrip().endswith("assistant")
    assert app.build_prompt(small_tok, "Hi", instruct=False) == "Hi"


def test_compare_runs_members_together(run_dir, app):
    family = app.family_from_dict(family_from_run(run_dir))
    updates = list(app.compare(family, app.ModelCache("cpu"), "Hello", ["tiny-big", "tiny-small"],
                               app.Settings(max_new_tokens=10)))
    assert updates[0]["tiny-big"].loading
    last = updates[-1]
    for name in ("tiny-big", "tiny-small"):
        assert last[name].done and last[name].error is None and last[name].tokens == 10 and last[name].text.strip()
        assert "tokens/s" in last[name].stats()


def test_prompt_is_capped_in_tokens(run_dir, app):
    """A pasted book is cut to its last max_prompt_tokens tokens (characters first), and the answer says so."""
    family = app.family_from_dict(family_from_run(run_dir))
    model, tokenizer = app.ModelCache("cpu").get(family.member("tiny-big"))
    assert app.clip_prompt(tokenizer, "Hello there", 32) == ("Hello there", False)
    huge = "pruning keeps the heads that matter " * 30_000  # a million characters
    done = app.generate(model, tokenizer, huge, settings=app.Settings(max_new_tokens=4, max_prompt_tokens=32))
    assert done.error is None and done.tokens == 4 and 0 < done.prompt_tokens <= 32 and done.clipped
    assert "prompt cut to its last" in done.stats()


def test_prompt_and_answer_fit_the_context(run_dir, app):
    family = app.family_from_dict(family_from_run(run_dir))
    model, tokenizer = app.ModelCache("cpu").get(family.member("tiny-big"))
    model.config.max_position_embeddings = 24  # this cache's own copy of the model
    done = app.generate(model, tokenizer, "one two three " * 200, settings=app.Settings(max_new_tokens=8))
    assert done.error is None and done.tokens == 8 and done.prompt_tokens <= 16 and done.clipped


def test_generation_is_queued_with_a_concurrency_limit(run_dir, app):
    demo = app.build_app(app.family_from_dict(family_from_run(run_dir)), app.ModelCache("cpu"), concurrency_limit=2,
                         max_prompt_tokens=100)
    assert demo._queue.default_concurrency_limit == 2 and demo._queue.max_size == app.QUEUE_SIZE
    generating = [fn for fn in demo.fns.values() if fn.name == "on_run"]
    assert len(generating) == 2 and all(fn.concurrency_limit == 2 and fn.concurrency_id == "generate"
                                        for fn in generating)


def test_members_load_from_safetensors_only(run_dir, app, tmp_path):
    """A member folder with pickled weights only (pytorch_model.bin) is refused, not unpickled."""
    folder = shutil.copytree(run_dir / "members" / "tiny-small", tmp_path / "pickled")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        app.load_member(app.Member("pickled", str(folder)))


def test_cli_space_flags():
    from hf_minitron.cli import build_parser
    from hf_minitron.cli.family import run_space

    args = build_parser().parse_args(["space", "runs/x", "--port", "7999", "--share"])
    assert args.source == ["runs/x"]
    assert (args.port, args.share, args.host) == (7999, True, "127.0.0.1")
    assert args.func is run_space


# ---- the app in a real browser ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser test needs Debian's Chromium and its driver: "
                    "apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # user data dir: a new temporary one


def test_app_in_headless_chromium(run_dir, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    demo = launch_space(run_dir, host="127.0.0.1", port=port, device="cpu", block=False, quiet=True)
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys("Tell me about pruning language models.")
        boxes = driver.find_elements(By.CSS_SELECTOR, "#members input[type=checkbox]")
        assert len(boxes) == 2
        for box in boxes:  # select both members
            if not box.is_selected():
                box.click()
        wait.until(lambda d: all(b.is_selected() for b in boxes))
        max_new = driver.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
        max_new.clear()
        max_new.send_keys("24")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def outputs(d):
            return [d.find_element(By.CSS_SELECTOR, f"#output-{i} textarea").get_attribute("value") for i in (0, 1)]

        def stats(d):
            return [d.find_element(By.CSS_SELECTOR, f"#stats-{i}").text for i in (0, 1)]

        wait.until(lambda d: all(o.strip() for o in outputs(d)) and
                   all("tokens/s" in s and "generating" not in s for s in stats(d)))
        texts, infos = outputs(driver), stats(driver)
        shot = ARTIFACTS / "compare.png"
        driver.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}\noutputs: {texts}\nstats: {infos}")
        assert all("latency" in s and "24 tokens" in s for s in infos), infos

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Evaluation')]").click()
        table = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#eval-table"))
        wait.until(lambda d: "tiny-small" in table.text and d.find_elements(By.CSS_SELECTOR, "#eval-plot img"))
        driver.save_screenshot(str(ARTIFACTS / "evaluation.png"))
    finally:
        driver.quit()
        demo.close()
