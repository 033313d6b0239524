"""berth's one retry rule: which failures are retried, how many attempts, how long between them.

The rule (STYLE.md "HTTP"; issue 9), for every loop berth itself runs around network traffic
(registry requests and operations, S3 stage-in ranges and stage-out rounds, https sources):

- **which**: connection errors, timeouts, a body that broke off, a transfer whose content did
  not verify, and the statuses :data:`RETRY_STATUSES` (5xx and 429). Never a refusal (401/403),
  a not-found (404), a precondition (412), a TLS failure or an error of this machine (disk full,
  a symbolic link refused): trying again cannot change those, it only delays the message;
- **how many**: :attr:`RetryPolicy.attempts` per *operation* (one blob, one object), shared by
  every loop that retries part of it (:class:`RetryBudget`), so nested loops cannot multiply
  them;
- **how long**: capped exponential backoff with full jitter (AWS architecture blog, 2015):
  before retry ``n`` (0-based) ``uniform(0, min(cap_s, base_s * 2**n))``, raised to a server's
  ``Retry-After`` (RFC 9110 10.2.3) when that is at most ``max_retry_after_s``;
- **a longer Retry-After stops at once**: a server that asks for more than ``max_retry_after_s``
  (a registry's hourly rate limit, a maintenance window) is not asked again sooner than it said
  (that is hammering it, and earns a longer ban), nor waited for inside a job holding its
  allocation: the operation fails without another attempt, and the error names the server, the
  wait it asked for and when to try again (:func:`refused_wait`). :meth:`RetryBudget.allows`
  judges it, for every loop.

A library that retries its own requests (obstore for S3, urllib3 for https sources) is
configured from the same policy's numbers (attempts, base and cap of the backoff, statuses),
so that one policy states them all. Such per-request retries sit below berth's own loops and
do multiply with them, boundedly: staging's one loop above a request (a range fetched again,
an object sent again in a later stage-out round) makes at most ``attempts`` x ``attempts``
requests of one range or object. The registry has no library retries below its budget.

The policies in use: the registry's (:class:`RetryPolicy` defaults; ``pull_retries`` is
``attempts - 1``) in :mod:`berth.registry.transport`, staging's (``STAGING_RETRY``) in
:mod:`berth.staging.transfer`.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone

from berth.record import Record, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Statuses that are retried (besides connection errors).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RetryPolicy(Record):
    """How many attempts one operation gets in all, and how long to wait between them (the
    module docstring states the rule). ``attempts`` bounds the tries of one *operation* (one
    manifest, one blob, one object), not of one loop: every layer that retries part of it draws
    from the same :class:`RetryBudget`. ``sleep`` and ``uniform`` are injectable so that tests
    count attempts without waiting."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 20.0
    max_retry_after_s: float = 60.0
    statuses: frozenset[int] = RETRY_STATUSES
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    uniform: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    @classmethod
    def with_retries(cls, retries: int, **kwargs: Any) -> "RetryPolicy":
        """The policy allowing ``retries`` retries after the first attempt (``pull_retries``)."""
        return cls(attempts=max(0, retries) + 1, **kwargs)

    def honours(self, retry_after_s: float | None) -> bool:
        """Whether a server's ``Retry-After`` (seconds; None: none sent) is a wait this policy
        takes before another attempt: at most ``max_retry_after_s``."""
        return retry_after_s is None or retry_after_s <= self.max_retry_after_s

    def delay_s(self, retry: int, retry_after_s: float | None = None) -> float:
        """The wait before retry number ``retry`` (0-based)."""
        delay = self.uniform(0.0, min(self.cap_s, self.base_s * (2 ** retry)))
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_retry_after_s))
        return delay

    def budget(self) -> "RetryBudget":
        """A fresh budget for one operation."""
        return RetryBudget(self)


class RetryBudget:
    """The attempts one operation has left under a :class:`RetryPolicy`; shared by every loop
    that retries part of the operation. Not thread-safe: one operation, one thread."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        #: Retries taken so far (attempts made = retries + 1).
        self.retries = 0
        #: The server's Retry-After (seconds) that stopped the operation, for its error
        #: (:func:`refused_wait`); None when none did.
        self.refused_wait_s: float | None = None

    @property
    def attempts(self) -> int:
        return self.retries + 1

    @property
    def can_retry(self) -> bool:
        return self.attempts < max(1, self.policy.attempts)

    def allows(self, retry_after_s: float | None = None) -> bool:
        """Whether one more attempt may follow a failure whose server asked to wait
        ``retry_after_s``: attempts are left and the wait is one the policy takes (else
        :attr:`refused_wait_s` keeps it for the error)."""
        if not self.policy.honours(retry_after_s):
            self.refused_wait_s = retry_after_s
            return False
        return self.can_retry

    def retry(self, retry_after_s: float | None = None) -> bool:
        """Wait before one more attempt and return True; False (at once) when :meth:`allows`
        does not: the operation has used all its attempts, or its server asked for a longer
        wait than the policy takes."""
        if not self.allows(retry_after_s):
            return False
        delay = self.policy.delay_s(self.retries, retry_after_s)
        if delay > 0:
            self.policy.sleep(delay)
        self.retries += 1
        return True


#: The stall rule's least progress: a response body that brings fewer bytes than this (or than
#: what is left of it) in one window of its timeout is stalled (:class:`StallWatch`).
STALL_MIN_BYTES = 64 * 1024


class StallWatch:
    """The stall rule, for every body berth reads from the network itself (registry blobs and
    documents, https stage-in sources): a read timeout stops only silence, and a server that
    sends a byte a minute kept ``berth pull`` (or a job's staging) waiting for good. A body
    that brings fewer than :data:`STALL_MIN_BYTES` in ``window_s`` seconds (the same setting as
    the read timeout: ``registry_timeout_s``, a profile's ``timeout_s``) is stalled; the reader
    raises a transient error, which the one retry rule resumes.

    The body is read through the watch (:meth:`read`, with ``read``: one ``read1`` of what has
    arrived, not a read that waits until a whole chunk is in), and the window counts only the
    time spent inside those reads: what the caller does with a chunk before asking for the next
    (a store write, a busy converter, a slow Lustre write) is not the server's time. Counting it
    made one pause longer than the window a false stall that used a retry and blamed the
    registry (over TLS a read brings at most one 16 KiB record)."""

    def __init__(self, window_s: float, read: Callable[[int], bytes], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._read = read
        self._clock = clock
        #: Seconds spent inside reads since the window started.
        self.waited_s = 0.0
        #: Bytes received since the window started.
        self.received = 0

    def read(self, size: int) -> bytes:
        """One read of at most ``size`` bytes of the body, its time counted in the window."""
        started = self._clock()
        try:
            return self._read(size)
        finally:
            self.waited_s += self._clock() - started

    def stalled(self, count: int) -> bool:
        """Count ``count`` bytes just received (call it only while more of the body is to
        come); True when the reads took longer than the window with too little progress."""
        self.received += count
        if self.received >= STALL_MIN_BYTES:
            self.waited_s, self.received = 0.0, 0
            return False
        return self.waited_s > self.window_s


def transient(error: BaseException) -> BaseException:
    """Mark ``error`` as one this rule retries (the network, a 5xx or 429, a body or a checksum
    that did not verify), for a loop above the code that raised it; returns it."""
    error.transient = True  # type: ignore[attr-defined]
    return error


def is_transient(error: BaseException) -> bool:
    """Whether a later attempt may succeed where ``error`` failed (marked by :func:`transient`)."""
    return getattr(error, "transient", False) is True


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):  # ASCII: str.isdigit() takes '²', which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def refused_wait(retry_after_s: float, policy: RetryPolicy, now: float | None = None) -> tuple[str, str]:
    """The words of an error for a ``Retry-After`` the policy does not wait for: (what the
    server asked, to follow its name; the hint: when to try again)."""
    until = time.gmtime((time.time() if now is None else now) + retry_after_s)
    return (f"asked berth to wait {retry_after_s:.0f} s before trying again (Retry-After), longer than berth "
            f"waits between attempts ({policy.max_retry_after_s:.0f} s): stopped without retrying",
            f"try again after {time.strftime('%Y-%m-%d %H:%M:%S UTC', until)}")
