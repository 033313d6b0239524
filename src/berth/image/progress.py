"""Progress events of a pull or import, for whoever displays them (the CLI; STYLE.md: only the
CLI prints). Events arrive from several download threads at once: implementations must be
thread-safe. Every method has a do-nothing default, so a listener implements what it needs.
"""

from __future__ import annotations

from berth.oci.digest import Digest


class PullProgress:
    """Base listener: subclass and override. ``None`` progress means nobody listens."""

    def resolved(self, reference: str, manifest_digest: Digest, layer_count: int,
                 total_bytes: int) -> None:
        """The manifest is known: ``layer_count`` blobs totalling ``total_bytes`` to get."""

    def blob_started(self, digest: Digest, size_bytes: int, offset: int) -> None:
        """A download starts (or resumes at ``offset``)."""

    def blob_bytes(self, digest: Digest, count: int) -> None:
        """``count`` more bytes of ``digest`` arrived."""

    def blob_restarted(self, digest: Digest, reason: str) -> None:
        """A download restarts after an error (``reason``) or an ignored Range request."""

    def blob_done(self, digest: Digest, size_bytes: int, cached: bool) -> None:
        """A blob is in the store; ``cached`` when it was there already (nothing fetched)."""

    def phase(self, text: str) -> None:
        """A step without byte counts begins ("converting to squashfs", "tagging")."""


def notify(progress: PullProgress | None, event: str, *args) -> None:
    """Call ``progress.EVENT(*args)`` if someone listens."""
    if progress is not None:
        getattr(progress, event)(*args)
