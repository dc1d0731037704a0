"""Data that cannot be used fails in one line naming the source (file, line, column), before any network or
training: missing local paths, empty, binary or malformed files, text columns without text."""

import json
import os
import re

import pytest

from hf_minitron.data import DataSourceError, TextSource, load_sft_dataset, load_text_dataset
from hf_minitron.data_checks import looks_local


@pytest.mark.parametrize("path, local", [
    ("corpus", False), ("org/corpus", False),  # Hub dataset ids
    ("data/train/part", True), ("./corpus", True), ("/abs/corpus", True), ("~/corpus", True),
    ("corpus.jsonl", True), ("org/corpus.parquet", True), ("data\\corpus", True),
])
def test_what_looks_like_a_local_path(path, local):
    assert looks_local(path) is local


def test_missing_local_path_is_named_before_any_network(tmp_path, monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("a missing local path went to the Hub")

    monkeypatch.setattr("hf_minitron.data._load_hub_dataset", no_hub)
    missing = str(tmp_path / "chats" / "train")  # no suffix: a path all the same
    with pytest.raises(DataSourceError, match=f"data file '{missing}': no such file or folder"):
        load_sft_dataset(missing)
    with pytest.raises(DataSourceError, match="data file 'data/v2/corpus': no such file or folder"):
        load_text_dataset("data/v2/corpus")


def test_bare_name_offline_says_it_is_neither_local_nor_cached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="'no-such-corpus' is neither a local file or folder nor in the local HF"):
        load_text_dataset("no-such-corpus")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\n  \n", "is empty"),
    (bytes(range(256)) * 20, "is not UTF-8 text (binary?)"),
    (b'{"text": "a"}\n\x00\x00\x00\n', "is not UTF-8 text (binary?)"),
])
def test_empty_or_binary_file_is_named(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataSourceError, match=re.escape(f"data file '{path}' {message}")):
        load_text_dataset(str(path))


@pytest.mark.parametrize("lines, where", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "line 2 is not valid JSON"),
    (['{"text": "a"}', '', '["text", "b"]'], "line 3 is not a JSON object"),
])
def test_malformed_json_lines_name_the_file_and_line(tmp_path, lines, where):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataSourceError, match=f"data file '{path}' {where}"):
        load_text_dataset(str(path))


@pytest.mark.parametrize("rows, message", [
    ([{"text": 1}, {"text": 2}], "holds int64 values, not text"),
    ([{"text": None}, {"text": None}], "holds null values, not text"),
    ([{"text": ""}, {"text": ""}], "has no text \\(every row is empty\\)"),
])
def test_text_column_without_text_is_named(tmp_path, rows, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataSourceError, match=f"column 'text' of data source '{path}' {message}"):
        load_text_dataset(str(path))


def test_some_empty_rows_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "words"}) + "\n")
    assert len(load_text_dataset(str(path))) == 2


def test_a_streamed_source_is_not_read_ahead(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "words"}) + "\n")
    assert next(iter(load_text_dataset(TextSource(str(path), streaming=True))))["text"] == "words"
    assert os.path.getsize(path) > 0
