"""Files written whole or not at all, through a unique temporary name beside the target."""

from __future__ import annotations

import os
import stat

import pytest

from caftkit.files.atomic import atomic_path, write_text_atomically


def test_the_target_appears_only_when_the_write_succeeds(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    # a user's own file with the name an older version staged through is never touched
    (tmp_path / "out.json.tmp").write_text("the user's file")
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_path(target) as staging:
            staging.write_text("half")
            raise RuntimeError("stopped")
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json", "out.json.tmp"]
    write_text_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert (tmp_path / "out.json.tmp").read_text() == "the user's file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json", "out.json.tmp"]


def test_a_new_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
