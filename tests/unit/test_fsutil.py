"""berth.fsutil: atomic replacement that never follows planted links and keeps old content on failure."""

import os
import stat

import pytest

from berth.fsutil import replace_in_directory, write_atomically


def test_write_replaces_content_with_exact_mode_whatever_the_umask(tmp_path):
    target = tmp_path / "f.toml"
    target.write_text("old")
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, "new ✓", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f.toml"]


def test_a_link_planted_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "d").mkdir()
    planted = tmp_path / "d" / "status"
    planted.symlink_to(victim)
    directory = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace_in_directory(directory, "status", b"0\n", 0o600)
    finally:
        os.close(directory)
    assert victim.read_text() == "precious"
    assert not planted.is_symlink() and planted.read_bytes() == b"0\n"


def test_failure_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "auth.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError) as info:
        write_atomically(target, b"x" * 100000, mode=0o600)
    assert info.value.errno == 28
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["auth.json"]
