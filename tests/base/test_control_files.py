"""Kernel control files are written in place, and nothing else can be written through them."""

from __future__ import annotations

from pathlib import Path

import pytest

from caftkit.files.controls import write_control


def test_a_kernel_control_file_is_written():
    """The thread's name (/proc/thread-self/comm) is a control file a process may write for itself."""
    comm = Path("/proc/thread-self/comm")
    before = comm.read_text()
    try:
        write_control(comm, "caft-control")
        assert comm.read_text() == "caft-control\n"
    finally:
        write_control(comm, before.strip())
    assert comm.read_text() == before


@pytest.mark.parametrize("name", ["notes.txt", "../notes.txt"])
def test_a_path_outside_proc_and_sys_is_refused_and_left_as_it_was(tmp_path, name):
    (tmp_path / "sub").mkdir()
    user_file = (tmp_path / "sub" / name).resolve()
    user_file.write_text("the user's")
    with pytest.raises(ValueError, match="not a kernel control file"):
        write_control(tmp_path / "sub" / name, "5")
    assert user_file.read_text() == "the user's"
    with pytest.raises(ValueError):  # dots do not lead out of /proc either
        write_control(f"/proc/../{user_file}", "5")
    assert user_file.read_text() == "the user's"


def test_a_control_file_that_is_not_there_is_not_made():
    with pytest.raises(FileNotFoundError):
        write_control("/proc/self/no-such-control", "5")
