"""Where everything lives inside a store. The only place that computes store paths.

::

    ROOT/
      blobs/sha256/HEX            verified blobs: manifests, configs, layers (immutable)
      images/sha256-HEX/          one directory per image, keyed by manifest digest
          image.sqfs              the flattened root filesystem, read-only SquashFS
          manifest.json           the image manifest (bytes exactly as pulled)
          config.json             the image config (bytes exactly as pulled)
          image.json              berth's metadata: source reference, sizes, compression
      index.json                  reference -> manifest digest (written last, atomically)
      tmp/                        partial downloads and conversions (same filesystem, so
                                  os.replace into blobs/ and images/ is atomic); a Slurm
                                  step's failed pull (step-pull-JOB.STEP.failed)
      locks/                      flock files: one per blob, per image, one for the index, and
                                  gc.lock (pulls and imports hold it shared, prune exclusive)

Site and user stores have the same layout (DESIGN.md decision 4).
"""

from __future__ import annotations

from pathlib import Path

from berth.oci.digest import Digest, InvalidDigest
from berth.record import Record

LAYOUT_VERSION = 1


class StoreLayout(Record):
    """The paths of the store at ``root`` (see the module docstring)."""

    root: Path

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    def blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_dir(self, manifest_digest: Digest) -> Path:
        return self.root / "images" / f"{manifest_digest.algorithm}-{manifest_digest.hex}"

    def image_squashfs(self, manifest_digest: Digest) -> Path:
        return self.image_dir(manifest_digest) / "image.sqfs"

    def image_manifest(self, manifest_digest: Digest) -> Path:
        return self.image_dir(manifest_digest) / "manifest.json"

    def image_config(self, manifest_digest: Digest) -> Path:
        return self.image_dir(manifest_digest) / "config.json"

    def image_meta(self, manifest_digest: Digest) -> Path:
        return self.image_dir(manifest_digest) / "image.json"

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def step_pull_failure(self, step: str) -> Path:
        """Left by the node that pulled an image for a Slurm step (``JOB.STEP``) when its pull
        failed, so that the step's other nodes, waiting for the image, stop at once with its
        reason (berth.image.api.wait_for_image); prune removes old ones with the rest of tmp/."""
        return self.tmp_dir / f"step-pull-{step}.failed"

    def partial_blob(self, digest: Digest) -> Path:
        """Where a blob download in progress lives; kept across interruptions for resuming."""
        return self.root / "tmp" / f"blob-{digest.algorithm}-{digest.hex}.partial"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def blob_lock(self, digest: Digest) -> Path:
        return self.root / "locks" / f"blob-{digest.algorithm}-{digest.hex}.lock"

    def image_lock(self, manifest_digest: Digest) -> Path:
        return self.root / "locks" / f"image-{manifest_digest.algorithm}-{manifest_digest.hex}.lock"

    @property
    def index_lock(self) -> Path:
        return self.root / "locks" / "index.lock"

    @property
    def version_file(self) -> Path:
        return self.root / "layout-version"

    @property
    def gc_lock(self) -> Path:
        """Held shared by every writer (pull, import) and exclusively by prune."""
        return self.root / "locks" / "gc.lock"

    def image_workdir_prefix(self, manifest_digest: Digest) -> str:
        """Name prefix of the tmp/ directories where an image is converted before publishing.

        Only the holder of the image's lock creates or removes directories with this prefix,
        so a crashed conversion's leftovers are recognised and removed by the next one.
        """
        return f"image-{manifest_digest.algorithm}-{manifest_digest.hex}-"

    def trash_prefix(self) -> str:
        """Name prefix of tmp/ entries being deleted (renamed there first, then removed)."""
        return "trash-"

    def import_prefix(self) -> str:
        """Name prefix of tmp/ files written while importing an archive."""
        return "import-"

    def blob_from_name(self, algorithm: str, name: str) -> Digest | None:
        """The digest a file ``blobs/ALGORITHM/NAME`` stands for, or None if it is not one."""
        return _digest_or_none(name, algorithm)

    def digest_from_image_dir(self, name: str) -> Digest | None:
        """The manifest digest an images/ entry name (``sha256-HEX``) stands for, or None."""
        algorithm, sep, hex_part = name.partition("-")
        return _digest_or_none(hex_part, algorithm) if sep else None


def _digest_or_none(hex_part: str, algorithm: str) -> Digest | None:
    try:
        return Digest.parse(f"{algorithm}:{hex_part}")
    except InvalidDigest:
        return None
