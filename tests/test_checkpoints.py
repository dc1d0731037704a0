"""Checkpoints: an interrupted save is set aside and the newest complete checkpoint is resumed from."""

from __future__ import annotations

import json

from hf_minitron.checkpoints import drop_checkpoints, last_complete_checkpoint


def complete(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return folder


def test_newest_complete_checkpoint_is_found(tmp_path):
    complete(tmp_path / "checkpoint-2")
    complete(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_interrupted_save_is_set_aside(tmp_path):
    complete(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")  # killed before the weights
    notes = []
    assert last_complete_checkpoint(tmp_path, log=notes.append) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "incomplete-checkpoint-4" / "config.json").is_file()
    assert not (tmp_path / "checkpoint-4").exists()
    assert len(notes) == 1 and "checkpoint-4 is incomplete" in notes[0]


def test_truncated_trainer_state_is_incomplete(tmp_path):
    folder = complete(tmp_path / "checkpoint-6")
    (folder / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path, log=lambda _: None) is None


def test_no_checkpoint_and_no_folder(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_drop_removes_checkpoints_and_set_aside_ones(tmp_path):
    complete(tmp_path / "checkpoint-2")
    (tmp_path / "incomplete-checkpoint-4").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"final")
    drop_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
