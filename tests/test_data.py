"""Data sources of every kind, one token convention (EOS after every document), held-out tails, SFT data."""

import json

import pytest
import torch

from hf_minitron.data import (BUILTIN_PYDOC, DataSourceError, TextSource, holdout_count, load_sft_dataset,
                               load_text_dataset, pack_tokens, split_holdout, token_ids, token_windows, window_bos)


@pytest.fixture
def corpus(tmp_path):
    texts = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 20 for i in range(6)]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "d.csv").write_text("body\n" + "".join(f'"{t}"\n' for t in texts))
    import pandas as pd

    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "e.parquet")
    return tmp_path


def test_every_local_format(corpus):
    assert len(load_text_dataset(str(corpus / "*.txt"))) == 2  # one row per file, not per line
    for name in ("c.jsonl", "d.csv", "e.parquet"):
        ds = load_text_dataset(TextSource(str(corpus / name), text_column="body"))
        assert len(ds) == 6


def test_missing_column_and_file_are_named(corpus):
    with pytest.raises(DataSourceError, match="no column 'text'; columns: body"):
        load_text_dataset(str(corpus / "c.jsonl"))
    with pytest.raises(DataSourceError, match="missing.jsonl': no such file or folder"):
        load_text_dataset(str(corpus / "missing.jsonl"))
    with pytest.raises(DataSourceError, match="matches no files"):
        load_text_dataset(str(corpus / "*.md"))


def test_packing_and_hash(corpus, smollm2_tokenizer):
    src = TextSource(str(corpus / "c.jsonl"), text_column="body")
    a = pack_tokens(src, smollm2_tokenizer, samples=4, seq_len=32)
    b = pack_tokens(src, smollm2_tokenizer, samples=4, seq_len=32)
    assert a.input_ids.shape == (4, 32) and a.sha256 == b.sha256 == a.source["sha256"]
    assert a.sha256 != pack_tokens(src, smollm2_tokenizer, samples=4, seq_len=32, seed=1).sha256
    with pytest.raises(DataSourceError, match="fewer than the 500 samples"):
        pack_tokens(src, smollm2_tokenizer, samples=500, seq_len=32)


def test_builtin_python_reference(smollm2_tokenizer):
    packed = pack_tokens(BUILTIN_PYDOC, smollm2_tokenizer, samples=8, seq_len=128)
    assert packed.source["corpus_tokens"] > 50_000
    windows = token_windows(BUILTIN_PYDOC, smollm2_tokenizer, 64, windows=3)
    assert windows.shape == (3, 64)


HUB_SCRIPT = """
from hf_minitron.data import TextSource, iterate_rows, load_text_dataset
def main():  # as pack_tokens does: the stream lives in a function and is closed on leaving early
    val = load_text_dataset(TextSource("acme/tiny-text", split="validation", text_column="content"))
    stream = load_text_dataset(TextSource("acme/tiny-text", text_column="content", streaming=True))
    with iterate_rows(stream) as rows:
        print(len(val), next(rows)["content"][:5])
main()
"""


def test_hub_dataset_id_from_offline_cache(tmp_path):
    """A Hub dataset id resolves through huggingface_hub's cache when HF_HUB_OFFLINE=1, streaming too."""
    import os
    import subprocess
    import sys

    import pandas as pd

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "datasets--acme--tiny-text"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    pd.DataFrame({"content": ["hello world " * 50] * 10}).to_parquet(data / "train-00000-of-00001.parquet")
    pd.DataFrame({"content": ["bye " * 50] * 3}).to_parquet(data / "validation-00000-of-00001.parquet")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for var in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "3 hello"


def test_streaming_reads_a_seeded_shuffle_not_the_first_documents(tmp_path, smollm2_tokenizer):
    import re

    texts = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 3 for i in range(60)]
    src = _docs(tmp_path, texts)
    src.streaming = True
    tok = smollm2_tokenizer
    packed = pack_tokens(src, tok, samples=4, seq_len=32)
    docs = [int(k) for k in re.findall(r"Document (\d+)\.", tok.decode(packed.input_ids.flatten()))]
    assert packed.input_ids.shape == (4, 32) and packed.source["shuffle_buffer"] == 10_000
    assert max(docs) >= 10  # unshuffled, 4 x 32 tokens reach only documents 0-3
    first = tok(f"Document {docs[0]}.", add_special_tokens=False)["input_ids"]
    assert packed.input_ids[0, : len(first)].tolist() == first  # windows are cut from the start of the shuffled stream
    assert packed.sha256 == pack_tokens(src, tok, samples=4, seq_len=32).sha256
    assert packed.sha256 != pack_tokens(src, tok, samples=4, seq_len=32, seed=1).sha256


# ---- one token stream for packing, perplexity and search -------------------------------------------------------------
def _docs(tmp_path, texts, name="docs.jsonl") -> TextSource:
    (tmp_path / name).write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return TextSource(str(tmp_path / name), text_column="body")


def test_eos_after_every_document(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = ["First document.", "", "Second one.", "Third and last."]
    ids = token_ids(_docs(tmp_path, texts), tok)
    expected = [i for t in texts if t for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert ids.dtype == torch.long and ids.tolist() == expected  # the empty text is skipped, the last one ends in EOS
    assert token_ids(_docs(tmp_path, texts), tok, max_tokens=5).tolist() == expected[:5]


def test_packing_uses_the_same_stream(corpus, smollm2_tokenizer):
    src = TextSource(str(corpus / "c.jsonl"), text_column="body")
    ids = token_ids(src, smollm2_tokenizer)
    n = len(ids) // 32
    packed = pack_tokens(src, smollm2_tokenizer, samples=n, seq_len=32)
    assert torch.equal(packed.input_ids, ids[: n * 32].view(n, 32)) and packed.source["corpus_tokens"] == len(ids)


def test_holdout_takes_the_tail_documents():
    from datasets import Dataset

    counts = [holdout_count(10, 0.2), holdout_count(10, 0.01), holdout_count(10, 0.0), holdout_count(1, 0.5)]
    assert counts == [2, 1, 0, 0]
    ds = Dataset.from_dict({"text": [f"doc {i}" for i in range(10)]})
    train, heldout = split_holdout(ds, 0.2)
    assert train["text"] == [f"doc {i}" for i in range(8)] and heldout["text"] == ["doc 8", "doc 9"]
    assert split_holdout(ds, 0.0) == (ds, None)
    stream = ds.to_iterable_dataset()
    assert split_holdout(stream, 0.2) == (stream, None)  # no length: never split


def test_token_windows_read_the_heldout_tail(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 10 for i in range(10)]
    windows = token_windows(_docs(tmp_path, texts), tok, 16, holdout=0.2)
    tail = [i for t in texts[8:] for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert windows.flatten().tolist() == tail[: windows.numel()] and windows.numel() > len(tail) - 16


def test_token_windows_count_is_capped(tmp_path, smollm2_tokenizer):
    src = _docs(tmp_path, ["The quick brown fox jumps over the lazy dog. " * 20] * 3)
    available = len(token_ids(src, smollm2_tokenizer)) // 16
    assert token_windows(src, smollm2_tokenizer, 16, windows=3).shape == (3, 16)
    assert token_windows(src, smollm2_tokenizer, 16).shape == (available, 16)
    assert token_windows(src, smollm2_tokenizer, 16, windows=10 * available).shape == (available, 16)


def test_token_windows_with_stride_give_the_sliding_stream(tmp_path, smollm2_tokenizer):
    src = _docs(tmp_path, ["The quick brown fox jumps over the lazy dog. " * 20] * 3)
    ids = token_windows(src, smollm2_tokenizer, 16, windows=4, stride=8)
    assert ids.tolist() == token_ids(src, smollm2_tokenizer)[: 3 * 8 + 16].tolist()


def test_token_windows_too_short_is_one_named_line(tmp_path, smollm2_tokenizer):
    src = _docs(tmp_path, ["Too short."], name="short.jsonl")
    with pytest.raises(DataSourceError) as err:
        token_windows(src, smollm2_tokenizer, 64)
    message = str(err.value)
    assert "\n" not in message and "short.jsonl" in message and "has 4 tokens" in message


# ---- SFT data through the same source handling -------------------------------------------------------------------
SEED_TASKS = [{"instruction": "Name a colour. ", "instances": [{"input": "", "output": "Blue."}]},
              {"instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"},
                                                                {"input": "1 1", "output": " 2 "}]}]
CONVERSATIONS = [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                 [{"role": "user", "content": "Add the numbers.\n\n2 3"}, {"role": "assistant", "content": "5"}],
                 [{"role": "user", "content": "Add the numbers.\n\n1 1"}, {"role": "assistant", "content": "2"}]]


def test_sft_alpaca_jsonl_becomes_conversations(tmp_path):
    (tmp_path / "seed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEED_TASKS))
    ds = load_sft_dataset(str(tmp_path / "seed.jsonl"))
    assert ds.column_names == ["messages"] and ds["messages"] == CONVERSATIONS


def test_sft_alpaca_json_list_becomes_conversations(tmp_path):
    (tmp_path / "seed.json").write_text(json.dumps(SEED_TASKS))
    assert load_sft_dataset(str(tmp_path / "seed.json"))["messages"] == CONVERSATIONS


def test_sft_text_column_holds_the_conversations(tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"id": i, "dialog": c}) + "\n"
                                                 for i, c in enumerate(CONVERSATIONS)))
    ds = load_sft_dataset(TextSource(str(tmp_path / "chat.jsonl"), text_column="dialog"))
    assert sorted(ds.column_names) == ["id", "messages"] and ds["messages"] == CONVERSATIONS


def test_sft_prompt_completion_parquet(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["2+2=", "1+1="], "completion": ["4", "2"]}).to_parquet(tmp_path / "pc.parquet")
    ds = load_sft_dataset(str(tmp_path / "pc.parquet"))
    assert ds["completion"] == ["4", "2"]


def test_sft_without_chat_columns_lists_them(tmp_path):
    (tmp_path / "q.csv").write_text("question,answer\nhi,hello\n")
    with pytest.raises(DataSourceError, match=r"q\.csv.*columns: question, answer$"):
        load_sft_dataset(str(tmp_path / "q.csv"))


def test_sft_hub_id_honours_config_and_split(tmp_path, monkeypatch):
    """Offline, from the huggingface_hub cache: the config and split of the `TextSource` pick the file."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--tiny-chat"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for config in ("short", "long"):
        (snap / config).mkdir(parents=True)
        for split in ("train", "validation"):
            rows = [{"prompt": f"{config} {split} {i}", "completion": "ok"} for i in range(2)]
            (snap / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = ["---", "configs:"]
    for config in ("short", "long"):
        card += [f"- config_name: {config}", "  data_files:"]
        card += [line for split in ("train", "validation")
                 for line in (f"  - split: {split}", f"    path: {config}/{split}.jsonl")]
    (snap / "README.md").write_text("\n".join(card + ["---", ""]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ds = load_sft_dataset(TextSource("acme/tiny-chat", config="long", split="validation"))
    assert ds["prompt"] == ["long validation 0", "long validation 1"]



# ---- BOS at the start of every window, when the tokenizer adds one ---------------------------------------------------
@pytest.fixture
def bos_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer made to add its BOS, as Llama 3's and Gemma's do."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_bos_token = True
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    return tok


def test_smollm2_adds_no_bos_so_windows_are_unchanged(corpus, smollm2_tokenizer):
    assert window_bos(smollm2_tokenizer) is None
    windows = token_windows(str(corpus / "a.txt"), smollm2_tokenizer, 16)
    assert torch.equal(windows, token_ids(str(corpus / "a.txt"), smollm2_tokenizer)[: windows.numel()].view(-1, 16))


def test_calibration_windows_start_with_bos(corpus, bos_tokenizer):
    src = TextSource(str(corpus / "c.jsonl"), text_column="body")
    ids = token_ids(src, bos_tokenizer)  # the text stream itself never holds the BOS
    assert bos_tokenizer.bos_token_id not in ids.tolist()
    n = len(ids) // 31
    packed = pack_tokens(src, bos_tokenizer, samples=n, seq_len=32)
    assert packed.input_ids.shape == (n, 32) and packed.source["bos"] == bos_tokenizer.bos_token_id
    assert (packed.input_ids[:, 0] == bos_tokenizer.bos_token_id).all()
    assert torch.equal(packed.input_ids[:, 1:], ids[: n * 31].view(n, 31))
    streamed = pack_tokens(TextSource(src.path, text_column="body", streaming=True), bos_tokenizer, 2, 32)
    assert (streamed.input_ids[:, 0] == bos_tokenizer.bos_token_id).all() and streamed.input_ids.shape == (2, 32)


def test_evaluation_windows_start_with_bos(tmp_path, bos_tokenizer):
    src = _docs(tmp_path, ["The quick brown fox jumps over the lazy dog. " * 20] * 3)
    ids = token_ids(src, bos_tokenizer)
    bos = bos_tokenizer.bos_token_id
    windows = token_windows(src, bos_tokenizer, 16, windows=3)
    assert windows.shape == (3, 16) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:], ids[:45].view(3, 15))
    strided = token_windows(src, bos_tokenizer, 16, windows=4, stride=8)
    assert strided.tolist() == [bos] + ids[: 3 * 8 + 15].tolist()


def test_token_windows_are_cut_once_per_cache(smollm2_tokenizer, monkeypatch):
    """A build scores every model on the same windows: with a shared cache the source is tokenized once."""
    import hf_minitron.data as data

    calls = []
    real = data.token_ids
    monkeypatch.setattr(data, "token_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = {}
    first = token_windows(BUILTIN_PYDOC, smollm2_tokenizer, 64, windows=3, cache=cache)
    again = token_windows(BUILTIN_PYDOC, smollm2_tokenizer, 64, windows=3, stride=64, cache=cache)
    assert torch.equal(first, again)
    assert len(calls) == 1
    token_windows(BUILTIN_PYDOC, smollm2_tokenizer, 64, windows=2, cache=cache)
    assert len(calls) == 2  # other windows, cut again
