"""Conversion overlaps the downloads (issue 10, target 4): the flattener reads the top layer
first, so pull downloads it first and starts converting it as soon as it is verified, while the
layers below still download. A proxy holds back one blob's body until the test lets it go, so
"conversion started before the last blob arrived" is observed, not timed; a corrupt blob or a
layer the flattener refuses still ends the pull with nothing published."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import typing
from pathlib import Path

import pytest

from tests.harness import images
from tests.harness.countingproxy import CountingProxy
from tests.harness.ocilayout import File, Layer
from tests.harness.storetest import (  # noqa: F401 - fixtures
    squashfs_cat, squashfs_listing, stores, via, wait_for,
)
from tests.harness.users import describe

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class HoldingProxy(CountingProxy):
    """Holds the body of blob ``hold`` until ``release`` is set, and sends blob ``corrupt``
    with its bytes inverted (same length: only the digest check can tell)."""

    hold: str = ""
    corrupt: str = ""
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: A blob whose body waits until ``settled()`` is true after the corrupt blob was sent
    #: (its download is then under way while berth finds the corrupt one out).
    hold_past_corrupt: str = ""
    settled: typing.Callable[[], bool] = lambda: True
    corrupt_sent: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: A blob whose first half is sent at once and the rest only once ``release`` is set;
    #: with ``cut_midway``, the connection is cut then instead (once); with
    #: ``corrupt_midway``, the rest is sent with its bytes inverted.
    hold_midway: str = ""
    cut_midway: bool = False
    corrupt_midway: bool = False

    def send_body(self, handler, response, is_blob_get, length) -> None:
        if is_blob_get and self.hold_midway and handler.path.endswith(self.hold_midway):
            handler.wfile.write(response.read(length // 2))
            handler.wfile.flush()
            self.release.wait(120)
            if self.cut_midway:
                self.hold_midway = ""
                return
            while chunk := response.read(64 * 1024):
                handler.wfile.write(bytes(255 - b for b in chunk) if self.corrupt_midway else chunk)
            handler.wfile.flush()
            return
        if is_blob_get and self.hold and handler.path.endswith(self.hold):
            self.release.wait(120)
        if is_blob_get and self.hold_past_corrupt and handler.path.endswith(self.hold_past_corrupt):
            self.corrupt_sent.wait(120)
            deadline = time.monotonic() + 60
            while not self.settled() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        if is_blob_get and self.corrupt and handler.path.endswith(self.corrupt):
            while chunk := response.read(64 * 1024):
                handler.wfile.write(bytes(255 - b for b in chunk))
            handler.wfile.flush()
            self.corrupt_sent.set()
            return
        super().send_body(handler, response, is_blob_get, length)


@pytest.fixture
def holding_proxy(registry):
    started = HoldingProxy(registry.host).start()
    yield started
    started.release.set()
    started.stop()


def _layers(image) -> list[str]:
    manifest = json.loads(Path(image.layout, "blobs", "sha256", image.digest.split(":")[1]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


#: Incompressible data in the top layer: once tar2sqfs has read this much of its input, the
#: top layer is being converted (the middle layer is tiny and the bottom one is held back).
TOP_BYTES = 2 << 20


@pytest.fixture(scope="session")
def three_layer_image(registry):
    spec = images.busybox_spec(marker="overlap", extra_layers=(
        Layer((File("opt/top.txt", "top layer\n"), File("opt/random.bin", random.Random(10).randbytes(TOP_BYTES)))),))
    return images.push_pushed_image(registry, "test/overlap", "1", spec, "oci")


def _converting(stores, image) -> bool:
    prefix = f"image-sha256-{image.digest.split(':')[1]}-"
    return any(name.startswith(prefix) for name in stores.tmp_entries())


def _converted_bytes(stores) -> int:
    """Bytes of tar stream the running tar2sqfs of this store has read so far (rchar of
    /proc/PID/io), 0 when none runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"tar2sqfs") or str(stores.user_store).encode() not in b" ".join(argv):
                continue
            fields = dict(line.split(": ") for line in (entry / "io").read_text().splitlines())
            return int(fields["rchar"])
        except (OSError, ValueError, KeyError):
            continue
    return 0


def _squashfs_bytes(stores, image) -> int:
    """Bytes of SquashFS the conversion of ``image`` has written in its tmp/ directory so far
    (it stays there until the image is published)."""
    prefix = f"image-sha256-{image.digest.split(':')[1]}-"
    for name in stores.tmp_entries():
        if name.startswith(prefix):
            try:
                return (stores.user_store / "tmp" / name / "image.sqfs").stat().st_size
            except OSError:
                return 0
    return 0


def _pull_while_held(stores, holding_proxy, image, least_bytes: int, what: str, *args: str,
                     while_held=lambda: None, converted=None) -> tuple[int, str, str]:
    """``berth pull ARGS`` of ``image`` through the proxy, which holds back (part of) a blob:
    waits until tar2sqfs has read ``least_bytes`` of tar stream (or until ``converted()``, when
    given; ``what`` says what failed if it never is), calls ``while_held``, then lets the blob
    through. (exit status, stdout, stderr)."""
    process = stores.popen("pull", "--insecure", *args, via(holding_proxy, image))
    if converted is None:
        def converted() -> bool:
            return _converted_bytes(stores) >= least_bytes
    try:
        assert wait_for(converted, timeout_s=60, interval_s=0.05), f"{what}; tmp/: {stores.tmp_entries()}"
        while_held()
    finally:
        holding_proxy.release.set()
        out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def _pull_converting_while_held(stores, holding_proxy, image, held: str, least_bytes: int, what: str,
                                converted=None) -> dict:
    """``berth pull --json`` of ``image`` through the proxy, which holds back (part of) the blob
    ``held``: tar2sqfs has read ``least_bytes`` of tar stream before the blob is stored, and
    nothing is published meanwhile; then the blob is let through. The pull's JSON result."""
    def unpublished() -> None:
        assert held not in stores.blobs()  # still held back: the conversion did not wait for it
        assert stores.image_dirs() == [] and stores.index() == {}

    status, out, err = _pull_while_held(stores, holding_proxy, image, least_bytes, what, "--json",
                                        while_held=unpublished, converted=converted)
    assert status == 0, err
    return json.loads(out)


def test_conversion_starts_before_the_bottom_layer_has_arrived(stores, holding_proxy, three_layer_image):
    bottom = _layers(three_layer_image)[0]
    holding_proxy.hold = bottom
    result = _pull_converting_while_held(stores, holding_proxy, three_layer_image, bottom, TOP_BYTES,
                                         "the top layer was not converted while the bottom layer was held")
    assert result["digest"] == three_layer_image.digest and result["downloaded_blobs"] == 4
    squashfs = Path(result["squashfs"])
    listing = squashfs_listing(squashfs)
    assert "bin/busybox" in listing and "opt/top.txt" in listing
    assert squashfs_cat(squashfs, "etc/berth-marker") == "overlap\n"
    assert stores.tmp_entries() == []


def _config(image) -> str:
    manifest = json.loads(Path(image.layout, "blobs", "sha256", image.digest.split(":")[1]).read_text())
    return manifest["config"]["digest"]


def test_conversion_starts_before_the_image_config_has_arrived(stores, holding_proxy, three_layer_image):
    # The config downloads beside the layers (its round trip and fsync kept the conversion from
    # starting; issue 10, target 4) and is read before publishing: held back, the top layer
    # converts meanwhile and nothing is published until it comes. Every layer comes, so
    # tar2sqfs may be done and gone before a look at it: the SquashFS it left in tmp/, larger
    # than the top layer's incompressible data, says the conversion went through it.
    config = _config(three_layer_image)
    holding_proxy.hold = config
    result = _pull_converting_while_held(stores, holding_proxy, three_layer_image, config, TOP_BYTES,
                                         "the top layer was not converted while the image config was held",
                                         converted=lambda: _squashfs_bytes(stores, three_layer_image) >= TOP_BYTES)
    assert result["digest"] == three_layer_image.digest and result["downloaded_blobs"] == 4
    assert json.loads(Path(result["squashfs"]).parent.joinpath("config.json").read_text())["rootfs"]
    assert stores.tmp_entries() == []


def test_a_corrupt_lower_blob_fails_the_overlapped_pull_with_nothing_published(stores, holding_proxy,
                                                                                three_layer_image):
    bottom, middle, _top = _layers(three_layer_image)
    holding_proxy.hold = holding_proxy.corrupt = bottom
    # The middle layer is still on its way when berth finds the bottom one corrupt (its body
    # comes once berth has thrown the corrupt blob's partial file away): its partial must go
    # too, nothing half-written stays (under load one was left behind).
    holding_proxy.hold_past_corrupt = middle
    holding_proxy.settled = lambda: not any(bottom.split(":")[1] in name for name in stores.tmp_entries())
    process = stores.popen("pull", "--insecure", via(holding_proxy, three_layer_image))
    try:
        assert wait_for(lambda: _converting(stores, three_layer_image), timeout_s=60)
    finally:
        holding_proxy.release.set()
        _out, err = process.communicate(timeout=120)
    assert process.returncode == 5, err
    assert "does not match its digest" in err and bottom in err
    assert "Traceback" not in err
    assert bottom not in stores.blobs()
    assert stores.image_dirs() == [] and stores.index() == {}
    assert stores.tmp_entries() == []  # no conversion directory, no partial of the corrupt blob


def test_a_refused_top_layer_fails_the_pull_while_the_layers_below_download(stores, holding_proxy, registry):
    # An owner beyond 32 bits (tar2sqfs would truncate uid 2**32 to root): the flattener
    # refuses it while the bottom layer is still on its way.
    hostile = Layer((File("opt/evil", "x\n", uid=2**32),))
    image = images.push_pushed_image(registry, "test/overlap-refused", "1",
                                     images.busybox_spec(marker="refused", extra_layers=(hostile,)), "oci")
    bottom, _etc, top = _layers(image)
    holding_proxy.hold = bottom
    timer = threading.Timer(3.0, holding_proxy.release.set)  # the refusal comes first
    timer.start()
    try:
        result = stores.berth("pull", "--insecure", via(holding_proxy, image), timeout=120)
    finally:
        timer.cancel()
        holding_proxy.release.set()
    assert result.returncode == 7, describe(result)
    assert "impossible owner" in result.stderr and top in result.stderr
    assert "Traceback" not in result.stderr
    assert stores.image_dirs() == [] and stores.index() == {}
    assert not any(name.startswith("image-") for name in stores.tmp_entries())


def test_a_layer_converts_while_it_downloads(stores, holding_proxy, three_layer_image):
    # Half of the top layer has arrived, the rest is held back: tar2sqfs is already reading
    # what the flattener made of that half (issue 10, target 4: a single-layer image no
    # longer waits for its whole download), and nothing is published before the blob is
    # verified.
    top = _layers(three_layer_image)[-1]
    holding_proxy.hold_midway = top
    result = _pull_converting_while_held(stores, holding_proxy, three_layer_image, top, TOP_BYTES // 4,
                                         "nothing of the top layer was converted while its second half was held")
    assert result["digest"] == three_layer_image.digest
    squashfs = Path(result["squashfs"])
    assert squashfs_cat(squashfs, "opt/top.txt") == "top layer\n"
    assert "opt/random.bin" in squashfs_listing(squashfs)
    assert stores.tmp_entries() == []


def test_a_corrupt_layer_converting_while_it_downloads_fails_as_a_digest_mismatch(stores, holding_proxy,
                                                                                  three_layer_image):
    # The top layer's first half is sound and is being converted while the rest is held back
    # (so this is the streaming path: a whole corrupt blob sent at once is usually stored, or
    # refused, before the flattener comes to it); the rest then comes corrupt and the
    # flattener fails on it first (igzip: invalid data). The pull still says what is wrong:
    # the registry's blob does not match its digest.
    top = _layers(three_layer_image)[-1]
    holding_proxy.hold_midway = top
    holding_proxy.corrupt_midway = True
    status, _out, err = _pull_while_held(stores, holding_proxy, three_layer_image, TOP_BYTES // 4,
                                         "nothing of the top layer was converted while its second half was held")
    assert status == 5, err
    assert "does not match its digest" in err and top in err
    assert "Traceback" not in err
    assert top not in stores.blobs()
    assert stores.image_dirs() == [] and stores.index() == {}
    assert stores.tmp_entries() == []


def test_a_layer_refused_while_it_downloads_is_refused_once(stores, holding_proxy, registry):
    # The top layer's first half, sent while the rest is held back, holds a large file and
    # then an owner beyond 32 bits, which the flattener refuses on the streamed bytes; more
    # data follows. The refusal stands for the verified blob (what streamed is its
    # beginning): the pull fails with it, and nothing is published (tests/unit/
    # test_pull_follow.py shows the stored blob is not converted again only to be refused).
    hostile = Layer((File("opt/random.bin", random.Random(11).randbytes(TOP_BYTES)),
                     File("opt/evil", "x\n", uid=2**32),
                     File("opt/after.bin", random.Random(12).randbytes(2 * TOP_BYTES))))
    image = images.push_pushed_image(registry, "test/overlap-refused-streaming", "1",
                                     images.busybox_spec(marker="refused", extra_layers=(hostile,)), "oci")
    top = _layers(image)[-1]
    holding_proxy.hold_midway = top
    status, _out, err = _pull_while_held(stores, holding_proxy, image, TOP_BYTES // 4,
                                         "nothing of the top layer was converted while its second half was held")
    assert status == 7, err
    assert "impossible owner" in err and top in err and "opt/evil" in err
    assert "Traceback" not in err
    assert top in stores.blobs()  # verified: the refusal is of the registry's real blob
    assert stores.image_dirs() == [] and stores.index() == {}
    assert not any(name.startswith("image-") for name in stores.tmp_entries())


def test_a_download_that_starts_over_while_converting_gives_the_right_image(stores, holding_proxy,
                                                                            three_layer_image):
    # The top layer's connection is cut halfway while the flattener reads it, and the registry
    # then ignores the Range request: the download starts over from byte 0; the conversion
    # must come from the verified blob (StreamUnusable, then the stored file).
    top = _layers(three_layer_image)[-1]
    holding_proxy.hold_midway = top
    holding_proxy.cut_midway = True
    holding_proxy.ignore_range = True
    status, out, err = _pull_while_held(stores, holding_proxy, three_layer_image, TOP_BYTES // 4,
                                        "nothing of the top layer was converted before the cut", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["digest"] == three_layer_image.digest
    ranges = [r for _m, _p, r in holding_proxy.blob_gets(top)]
    assert len(ranges) == 2  # cut, then the whole blob again
    squashfs = Path(result["squashfs"])
    assert squashfs_cat(squashfs, "opt/top.txt") == "top layer\n"
    assert squashfs_cat(squashfs, "etc/berth-marker") == "overlap\n"
    assert stores.tmp_entries() == []


def test_a_pull_killed_while_a_layer_converts_as_it_downloads_leaves_the_store_consistent(
        stores, holding_proxy, three_layer_image):
    # kill -9 while the flattener reads the top layer's partial file: nothing is published,
    # the partial stays for the next pull to resume (a Range request), the conversion
    # directory is the next conversion's garbage, and that pull gives the right image.
    from tests.integration.test_store_crash import _kill, assert_consistent

    top = _layers(three_layer_image)[-1]
    holding_proxy.hold_midway = top
    process = stores.popen("pull", "--insecure", via(holding_proxy, three_layer_image))
    try:
        assert wait_for(lambda: _converted_bytes(stores) >= TOP_BYTES // 4, timeout_s=60, interval_s=0.05)
    finally:
        killed = _kill(process)
        holding_proxy.hold_midway = ""
        holding_proxy.release.set()
    assert killed, "berth finished before the kill"
    assert stores.image_dirs() == [] and stores.index() == {}
    assert top not in stores.blobs()
    assert f"blob-sha256-{top[7:]}.partial" in stores.tmp_entries()
    assert_consistent(stores)
    holding_proxy.reset()
    result = stores.json("pull", "--insecure", "--json", via(holding_proxy, three_layer_image))
    assert result["digest"] == three_layer_image.digest
    ranges = [r for _m, _p, r in holding_proxy.blob_gets(top)]
    assert len(ranges) == 1 and ranges[0] is not None and ranges[0] != "bytes=0-"  # resumed
    assert squashfs_cat(Path(result["squashfs"]), "opt/top.txt") == "top layer\n"
    assert_consistent(stores)
