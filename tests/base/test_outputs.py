"""Which paths a command may write, and the lock that keeps two runs off one output."""

import subprocess
import sys

import pytest

from caftkit.files.outputs import (
    OUTPUT_MARKER,
    OutputError,
    check_output_folder,
    claim,
    claimed,
    mark_output_folder,
    output_folder,
    output_lock,
    output_maker,
    remove_claimed,
    replace_folder,
)


def test_a_lock_held_by_another_process_refuses_and_is_free_once_it_ends(tmp_path):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from caftkit.files.outputs import output_lock\n"
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


def marker_of_another_folder(tmp_path, command: str) -> str:
    """The marker `command` wrote for another folder: what a user copying it gets."""
    elsewhere = tmp_path / "elsewhere"
    mark_output_folder(elsewhere, command)
    return (elsewhere / OUTPUT_MARKER).read_text()


@pytest.mark.parametrize("contents, marker, allowed", [
    ({}, None, True),                                  # empty
    ({}, "eval", True),                                # this command's
    ({"eval_settings.json": "{}"}, None, False),       # the names this command writes make nothing its own
    ({"generations.jsonl": '{"id": 1}'}, None, False),
    ({}, "finetune", False),                           # another command's
    ({"notes.txt": "mine"}, None, False),              # a user's
    ({"notes.txt": "mine"}, "copied", False),          # this command's marker, copied from another folder
    ({OUTPUT_MARKER: '{"command": "eval"}'}, None, False),  # a marker that records no folder
    # The main process of a launched run writing the marker while another process checks the folder.
    ({f".{OUTPUT_MARKER}.k2j4x9.partial": ""}, None, True),
    ({f".{OUTPUT_MARKER}.k2j4x9.partial": "", "notes.txt": "mine"}, None, False),
])
def test_which_folders_a_command_takes(tmp_path, contents, marker, allowed):
    folder = tmp_path / "out"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    if marker == "copied":
        (folder / OUTPUT_MARKER).write_text(marker_of_another_folder(tmp_path, "eval"))
    elif marker is not None:
        mark_output_folder(folder, marker)
    before = {path.name: path.read_text() for path in folder.iterdir()}
    if allowed:
        check_output_folder(folder, "eval")
    else:
        with pytest.raises(OutputError, match=f"{folder}: "):
            check_output_folder(folder, "eval")
    assert {path.name: path.read_text() for path in folder.iterdir()} == before


def test_only_what_a_command_claimed_is_removed(tmp_path):
    folder = tmp_path / "run"
    mark_output_folder(folder, "finetune")
    (folder / "final").mkdir()
    (folder / "final" / "model.safetensors").write_text("weights")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"{folder / 'final'}: not written by caft; left as it is"):
        remove_claimed(folder, "final")
    claim(folder, "final", "checkpoints/checkpoint-2", "checkpoints/checkpoint-4")
    assert claimed(folder) == {"final", "checkpoints/checkpoint-2", "checkpoints/checkpoint-4"}
    remove_claimed(folder, "final")
    assert not (folder / "final").exists() and (folder / "notes.txt").read_text() == "mine"
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    claim(folder, "checkpoints")
    remove_claimed(folder, "checkpoints")  # its claimed contents go with it, from the folder and from the marker
    assert claimed(folder) == set() and not (folder / "checkpoints").exists()
    # a claim reaching outside the folder (a hand-edited marker) removes nothing there
    (tmp_path / "outside.txt").write_text("mine")
    claim(folder, "../outside.txt")
    with pytest.raises(OutputError, match="not written by caft; left as it is"):
        remove_claimed(folder, "../outside.txt")
    assert (tmp_path / "outside.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="holds no caft marker of its own"):
        claim(tmp_path, "x")
    # A copied marker claims nothing in the folder it was copied to.
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "final").write_text("thesis")
    claim(folder, "final")
    (tmp_path / "user" / OUTPUT_MARKER).write_text((folder / OUTPUT_MARKER).read_text())
    assert output_maker(tmp_path / "user") is None and claimed(tmp_path / "user") == set()
    with pytest.raises(OutputError):
        remove_claimed(tmp_path / "user", "final")
    assert (tmp_path / "user" / "final").read_text() == "thesis"


def test_a_symlink_and_its_target_are_one_output(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with output_lock(tmp_path / "real"):
        with pytest.raises(OutputError, match=f"{tmp_path / 'alias'}: another caft run is writing this output"):
            with output_lock(tmp_path / "alias"):
                pass


def test_a_folder_written_whole_replaces_only_its_own_earlier_self(tmp_path):
    out = tmp_path / "model"
    with replace_folder(out, "export") as staging:
        (staging / "model.safetensors").write_text("first")
    assert claimed(out) == {"model.safetensors"} and output_maker(out) == "export"
    with replace_folder(out, "export") as staging:
        (staging / "model.safetensors").write_text("second")
    assert (out / "model.safetensors").read_text() == "second"
    # a file added to the export since: refused, nothing changed
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"{out}: holds notes.txt, which caft export did not write"):
        with replace_folder(out, "export"):
            pytest.fail("the block must not run")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_text() == "second"
    # a user's folder holding a copy of an export's marker: refused, the user's weights kept
    user = tmp_path / "user-model"
    user.mkdir()
    (user / "model.safetensors").write_text("the user's")
    (user / OUTPUT_MARKER).write_text((out / OUTPUT_MARKER).read_text())
    with pytest.raises(OutputError, match=f"{user}: exists and was not written by caft export"):
        with replace_folder(user, "export"):
            pytest.fail("the block must not run")
    assert (user / "model.safetensors").read_text() == "the user's"


def test_what_an_interrupted_replacement_left_is_removed_by_the_next_naming_it(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with replace_folder(out, "export") as staging:
            (staging / "model.safetensors").write_text("half")
            kept = tmp_path / ".model.killed.partial"
            staging.rename(kept)  # as a kill leaves it: the cleanup never ran
            raise KeyboardInterrupt
    users = tmp_path / ".model.mine.partial"  # a folder of the user's with a name alike: not caft's, kept
    users.mkdir()
    with pytest.warns(UserWarning, match=rf"{kept}: removed, left by an interrupted caft export"):
        with replace_folder(out, "export") as staging:
            (staging / "model.safetensors").write_text("whole")
    assert not kept.exists() and users.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.mine.partial", "model"]


def test_a_users_file_where_the_lock_goes_is_neither_used_nor_removed(tmp_path):
    (tmp_path / ".run.caft-lock").write_text("a user's file")
    with pytest.raises(OutputError, match=r"\.run\.caft-lock: exists and is not a caft lock file"):
        with output_lock(tmp_path / "run"):
            pass
    assert (tmp_path / ".run.caft-lock").read_text() == "a user's file"
