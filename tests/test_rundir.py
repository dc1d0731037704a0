"""The run folder's names and member records: MemberRecord round trip and old schemas, reserved names, the finder."""

from __future__ import annotations

import json

import pytest
from helpers import write_base_member, write_instruct_member, write_member_folder

from hf_minitron import rundir
from hf_minitron.rundir import MemberRecord, MemberRecordError, find_member_folders

OLD_BASE = {"name": "m-90M", "parent": None, "teacher": "org/teacher", "distilled_from": "teacher",
            "instruct": False, "recipe": "fam"}
OLD_CHAINED = {"name": "m-45M", "parent": "m-90M", "teacher": "org/teacher", "distilled_from": "m-90M",
               "instruct": False, "recipe": "fam"}
OLD_INSTRUCT = {"name": "m-90M-instruct", "parent": "m-90M", "teacher": "org/teacher", "instruct": True}


def _old(tmp_path, data: dict) -> MemberRecord:
    (tmp_path / rundir.MEMBER_FILE).write_text(json.dumps(data))
    return MemberRecord.read(tmp_path)


# ---- MemberRecord ----


def test_member_record_round_trip(tmp_path):
    record = MemberRecord("m-45M", "base", teacher="org/teacher", pruned_from="m-90M", distilled_from="teacher",
                          recipe="fam", shape={"ffn_size": 48}, tokens={"distillation": 1000})
    record.write(tmp_path)
    assert MemberRecord.read(tmp_path) == record


def test_member_record_write_leaves_no_temporary_file(tmp_path):
    MemberRecord("m").write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [rundir.MEMBER_FILE]


def test_member_record_missing_is_none(tmp_path):
    assert MemberRecord.read(tmp_path) is None


def test_member_record_broken_json_names_the_file(tmp_path):
    (tmp_path / rundir.MEMBER_FILE).write_text("{")
    with pytest.raises(MemberRecordError, match="member.json' is not valid JSON"):
        MemberRecord.read(tmp_path)


def test_member_record_unknown_key_is_an_error(tmp_path):
    (tmp_path / rundir.MEMBER_FILE).write_text(json.dumps({"name": "m", "kind": "base", "colour": "red"}))
    with pytest.raises(MemberRecordError, match="unknown keys"):
        MemberRecord.read(tmp_path)


def test_member_record_kind_is_checked():
    with pytest.raises(MemberRecordError, match="kind must be"):
        MemberRecord("m", "chat")


def test_old_base_schema_was_pruned_from_the_teacher(tmp_path):
    record = _old(tmp_path, OLD_BASE)
    assert record.kind == "base", record
    assert record.pruned_from == rundir.TEACHER, "no parent: pruned from the teacher"
    assert record.distilled_from == "teacher"
    assert (record.teacher, record.recipe, record.sft_from) == ("org/teacher", "fam", None)


def test_old_chained_schema_was_pruned_from_its_parent(tmp_path):
    record = _old(tmp_path, OLD_CHAINED)
    assert record.pruned_from == "m-90M", record
    assert record.distilled_from == "m-90M", record


def test_old_instruct_schema_parent_is_sft_from(tmp_path):
    record = _old(tmp_path, OLD_INSTRUCT)
    assert record.kind == "instruct", record
    assert record.sft_from == "m-90M", "the old 'parent' of an instruct variant is the member it was fine-tuned from"
    assert record.pruned_from is None, "an instruct variant was not pruned"
    assert record.distilled_from is None, "an instruct variant was not distilled"


# ---- names ----


@pytest.mark.parametrize("name", ["teacher", "parent", "family", "importance", "work", "eval", "manifest.json"])
def test_reserved_names(name):
    assert name in rundir.RESERVED_NAMES


def test_stage_file_names_agree_with_the_stage_modules():
    from hf_minitron import distill, evaluate, search, sft

    assert rundir.SEARCH_FILE == search.SEARCH_FILE
    assert rundir.EVAL_FILE == evaluate.RESULTS_FILE
    assert rundir.DISTILL_FILE == distill.RESULT_FILE
    assert rundir.SFT_FILE == sft.RESULT_FILE


# ---- the member finder ----


def _run(tmp_path):
    """A built run: manifest, a base member, its instruct variant, and the work and importance folders."""
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.MANIFEST).write_text("{}")
    write_base_member(run / "m")
    write_instruct_member(run / "m-instruct", base="m")
    write_member_folder(run / rundir.WORK_DIR / "m" / rundir.PRUNED_DIR)  # a model, but no member.json
    (run / rundir.IMPORTANCE_DIR / rundir.TEACHER).mkdir(parents=True)
    return run


def test_finder_takes_the_folders_with_a_member_record(tmp_path):
    run = _run(tmp_path)
    assert find_member_folders(run) == [run / "m", run / "m-instruct"]


def test_finder_without_records_skips_nested_checkpoints(tmp_path):
    write_member_folder(tmp_path / "a")
    write_member_folder(tmp_path / "a" / "checkpoint-5")  # a trainer checkpoint inside the member folder
    write_member_folder(tmp_path / "b")
    assert find_member_folders(tmp_path) == [tmp_path / "a", tmp_path / "b"]


def test_finder_without_records_skips_the_work_folder_of_a_run(tmp_path):
    (tmp_path / rundir.MANIFEST).write_text("{}")
    write_member_folder(tmp_path / "a")
    write_member_folder(tmp_path / rundir.WORK_DIR / "a" / rundir.PRUNED_DIR)
    assert find_member_folders(tmp_path) == [tmp_path / "a"]


def test_finder_skips_folders_without_weights(tmp_path):
    write_member_folder(tmp_path / "a")
    write_member_folder(tmp_path / "config-only", weights=False)
    assert find_member_folders(tmp_path) == [tmp_path / "a"]


def test_finder_on_a_member_folder_returns_it(tmp_path):
    folder = write_member_folder(tmp_path / "a")
    assert find_member_folders(folder) == [folder]


def test_finder_on_a_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_member_folders(tmp_path / "nope")


# ---- paths ----


def test_run_paths_use_the_names(tmp_path):
    run = rundir.RunDir(tmp_path, {"stages": {}})
    assert run.pruned("m") == tmp_path / "work" / "m" / "checkpoint-pruned"
    assert run.teacher_eval() == tmp_path / "eval" / "teacher.json"
    assert run.family() == tmp_path / "family"


def test_a_held_run_folder_refuses_a_second_build(tmp_path):
    import os

    from hf_minitron.rundir import RunLockedError, lock_run

    first = lock_run(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by PID {os.getpid()} on "):
            lock_run(tmp_path)
    finally:
        first.close()
    lock_run(tmp_path).close()  # free again once the holder let go


def test_a_lock_left_by_a_dead_build_is_taken_over(tmp_path):
    from hf_minitron.rundir import LOCK_FILE, lock_run

    (tmp_path / LOCK_FILE).write_text("PID 999999 on elsewhere since 2026-01-01T00:00:00\n")
    handle = lock_run(tmp_path)
    assert "PID 999999" not in (tmp_path / LOCK_FILE).read_text()
    handle.close()


# ---- a rerun checks a finished stage's outputs ----


def _stage(run, calls, log=None):
    """A stage writing a weights file and a config into RUN/m; `calls` counts how often it really ran."""
    from hf_minitron.rundir import StageOutput, hash_folder

    def fn(action):
        calls.append(action)
        folder = run.root / "m"
        folder.mkdir(exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        (folder / "config.json").write_text("{}")
        (folder / "README.md").write_text("a card, rewritten by every report")
        return StageOutput(folder, hash_folder(folder))

    return run.stage("m/distill", {"a": 1}, {"p": "x"}, fn, log=log or (lambda _: None))


def test_finished_stage_with_its_outputs_intact_is_skipped(tmp_path):
    run, calls = rundir.RunDir(tmp_path, {"stages": {}}), []
    _stage(run, calls)
    (tmp_path / "m" / "README.md").write_text("another card")  # not an output of the stage
    _stage(run, calls)
    assert calls == ["run"]


def test_truncated_output_is_redone_with_a_note(tmp_path):
    run, calls, lines = rundir.RunDir(tmp_path, {"stages": {}}), [], []
    _stage(run, calls)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w" * 10)
    _stage(run, calls, lines.append)
    assert calls == ["run", "redo"]
    assert lines == ["[m/distill] redo: m/model.safetensors is 10 bytes, was 1,000"]


def test_output_with_same_size_new_bytes_is_redone_and_a_touched_one_is_not(tmp_path):
    import os

    run, calls, lines = rundir.RunDir(tmp_path, {"stages": {}}), [], []
    _stage(run, calls)
    weights = tmp_path / "m" / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # same bytes, another mtime: hashed, found equal, trusted from now on
    _stage(run, calls)
    assert calls == ["run"]
    assert run.record("m/distill")["outputs"]["files"]["m/model.safetensors"]["mtime_ns"] == 1
    weights.write_bytes(b"v" * 1000)
    _stage(run, calls, lines.append)
    assert calls == ["run", "redo"] and lines == ["[m/distill] redo: m/model.safetensors was modified (another sha256)"]


def test_deleted_output_file_is_redone(tmp_path):
    run, calls, lines = rundir.RunDir(tmp_path, {"stages": {}}), [], []
    _stage(run, calls)
    (tmp_path / "m" / "config.json").unlink()
    _stage(run, calls, lines.append)
    assert calls == ["run", "redo"] and lines == ["[m/distill] redo: m/config.json is missing"]


def test_record_of_an_older_build_without_files_is_trusted(tmp_path):
    run, calls = rundir.RunDir(tmp_path, {"stages": {}}), []
    _stage(run, calls)
    del run.record("m/distill")["outputs"]["files"]
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w")
    _stage(run, calls)
    assert calls == ["run"]
