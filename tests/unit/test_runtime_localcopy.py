"""Node-local copies of SquashFS files (stage_to_local): made once, verified, refreshed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from berth.errors import RuntimeFailure
from berth.oci.digest import Digest
from berth.runtime.localcopy import local_copy


def test_copy_is_made_once_and_reused(tmp_path):
    source = tmp_path / "image.sqfs"
    source.write_bytes(b"sqsh" * 1000)
    digest = Digest.of(b"manifest")
    first = local_copy(tmp_path / "state", source, digest)
    assert first == tmp_path / "state" / "images" / f"sha256-{digest.hex}.sqfs"
    assert first.read_bytes() == source.read_bytes()
    inode = first.stat().st_ino
    again = local_copy(tmp_path / "state", source, digest)
    assert (again, again.stat().st_ino) == (first, inode)
    leftovers = sorted(p.name for p in (tmp_path / "state" / "images").iterdir())
    assert leftovers == [f"sha256-{digest.hex}.lock", f"sha256-{digest.hex}.sqfs"]


def test_a_changed_source_is_copied_again(tmp_path):
    source = tmp_path / "x.sqfs"
    source.write_bytes(b"old content")
    first = local_copy(tmp_path / "state", source)
    source.write_bytes(b"new content, longer")
    os.utime(source, ns=(0, first.stat().st_mtime_ns + 10**9))
    second = local_copy(tmp_path / "state", source)
    assert second.read_bytes() == b"new content, longer"


def test_concurrent_callers_share_one_copy(tmp_path):
    source = tmp_path / "big.sqfs"
    source.write_bytes(os.urandom(4 << 20))
    code = ("import sys; from pathlib import Path; from berth.runtime.localcopy import local_copy; "
            "print(local_copy(Path(sys.argv[1]), Path(sys.argv[2])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state"), str(source)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    assert Path(outputs.pop()).read_bytes() == source.read_bytes()
    assert not [p for p in (tmp_path / "state" / "images").iterdir() if p.name.endswith(".tmp")]


def test_unusable_state_directory_is_a_clear_failure(tmp_path):
    source = tmp_path / "x.sqfs"
    source.write_bytes(b"x")
    state = tmp_path / "state"
    state.mkdir()
    (state / "images").write_text("not a directory")  # fails for root too
    with pytest.raises(RuntimeFailure) as info:
        local_copy(state, source)
    assert "cannot copy the image" in str(info.value) and "stage_to_local" in info.value.hint
