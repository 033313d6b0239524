"""berth.retry's stall rule (StallWatch) with a clock the test moves."""

from __future__ import annotations

from berth.retry import STALL_MIN_BYTES, StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watch(clock: Clock, read_s: float, chunk: int) -> StallWatch:
    def read(size: int) -> bytes:
        clock.now += read_s  # the time the server takes to bring the bytes
        return b"x" * min(size, chunk)

    return StallWatch(10.0, read, clock=clock)


def test_the_callers_time_between_reads_is_not_counted():
    """A fast body read by a caller that pauses 60 s per chunk (a slow store write) is no stall:
    only the time inside the reads counts (review10: the pause was charged to the server)."""
    clock = Clock()
    watch = _watch(clock, read_s=0.001, chunk=1024)
    for _ in range(200):
        assert not watch.stalled(len(watch.read(1 << 20)))
        clock.now += 60
    assert watch.waited_s < 1


def test_a_trickle_is_still_a_stall():
    """A server that brings 1 KiB a second (under 64 KiB in the 10 s window) is stalled once the
    reads have taken longer than the window, whatever the caller does in between."""
    clock = Clock()
    watch = _watch(clock, read_s=1.0, chunk=1024)
    reads = 0
    while not watch.stalled(len(watch.read(1 << 20))):
        reads += 1
        clock.now += 5
    assert (reads + 1, watch.received, watch.waited_s) == (11, 11 * 1024, 11.0)  # past the 10 s window


def test_progress_starts_a_new_window():
    clock = Clock()
    watch = _watch(clock, read_s=4.0, chunk=STALL_MIN_BYTES)
    for _ in range(10):
        assert not watch.stalled(len(watch.read(1 << 20)))  # 64 KiB per 4 s: slow, but progress
    assert watch.received == 0 and watch.waited_s == 0.0


def test_a_read_that_raises_is_counted_and_passes_through():
    clock = Clock()

    def read(size: int) -> bytes:
        clock.now += 3
        raise TimeoutError("silence")

    watch = StallWatch(10.0, read, clock=clock)
    try:
        watch.read(10)
    except TimeoutError:
        pass
    assert watch.waited_s == 3
