"""Which paths a command may write, and the lock that keeps two runs off one output."""

import subprocess
import sys

import pytest

from caftkit.outputs import (
    OUTPUT_MARKER,
    OutputError,
    check_output_folder,
    output_folder,
    output_lock,
    output_maker,
)


def test_a_lock_held_by_another_process_refuses_and_is_free_once_it_ends(tmp_path):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from caftkit.outputs import output_lock\n"
         f"with output_lock({str(output)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputError, match=f"{output}: another caft run is writing this output"):
            with output_lock(output):
                pass
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert not (tmp_path / ".run.caft-lock").exists()  # removed on release
    with output_lock(output):
        assert (tmp_path / ".run.caft-lock").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_new_folder_is_marked_and_a_run_that_wrote_nothing_leaves_none(tmp_path):
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "run", "finetune"):
            assert output_maker(tmp_path / "run") == "finetune"
            raise RuntimeError("the model was refused")
    assert not (tmp_path / "run").exists()
    with output_folder(tmp_path / "run", "finetune") as run:
        (run / "caft_run.json").write_text("{}")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [OUTPUT_MARKER, "caft_run.json"]
    with output_folder(tmp_path / "run", "finetune"):  # its own folder: taken again
        pass


def test_an_empty_folder_of_the_user_is_used_and_given_back_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        with output_folder(tmp_path / "empty", "eval"):
            raise ValueError("bad data")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("contents, allowed", [
    ({}, True),                                        # empty
    ({OUTPUT_MARKER: '{"command": "eval"}'}, True),    # this command's
    ({"eval_settings.json": "{}"}, True),               # an earlier release's output of this command
    ({OUTPUT_MARKER: '{"command": "finetune"}'}, False),  # another command's
    ({"notes.txt": "mine"}, False),                    # a user's
    # The main process of a launched run writing the marker while another process checks the folder.
    ({f".{OUTPUT_MARKER}.k2j4x9.partial": ""}, True),
    ({f".{OUTPUT_MARKER}.k2j4x9.partial": "", "notes.txt": "mine"}, False),
])
def test_which_folders_a_command_takes(tmp_path, contents, allowed):
    folder = tmp_path / "out"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    if allowed:
        check_output_folder(folder, "eval", ("eval_settings.json",))
    else:
        with pytest.raises(OutputError, match=f"{folder}: "):
            check_output_folder(folder, "eval", ("eval_settings.json",))
    assert {path.name: path.read_text() for path in folder.iterdir()} == contents


def test_a_users_file_where_the_lock_goes_is_neither_used_nor_removed(tmp_path):
    (tmp_path / ".run.caft-lock").write_text("a user's file")
    with pytest.raises(OutputError, match=r"\.run\.caft-lock: exists and is not a caft lock file"):
        with output_lock(tmp_path / "run"):
            pass
    assert (tmp_path / ".run.caft-lock").read_text() == "a user's file"
