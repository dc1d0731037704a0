"""Calibration data from local files of every kind, CPython's built-in text, packing and clear errors."""

import json

import pytest

from hf_minitron.data import BUILTIN_PYDOC, DataSourceError, TextSource, load_text_dataset, pack_tokens, text_windows


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
    with pytest.raises(DataSourceError, match="does not exist"):
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
    windows = text_windows(BUILTIN_PYDOC, smollm2_tokenizer, 64, max_windows=3)
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


def test_streaming_takes_first_windows(corpus, smollm2_tokenizer):
    src = TextSource(str(corpus / "c.jsonl"), text_column="body", streaming=True)
    packed = pack_tokens(src, smollm2_tokenizer, samples=2, seq_len=32)
    assert packed.input_ids.shape == (2, 32)
    first = smollm2_tokenizer("Document 0.", add_special_tokens=False)["input_ids"]
    assert packed.input_ids[0, : len(first)].tolist() == first
