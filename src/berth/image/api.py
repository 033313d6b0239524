"""What the rest of berth uses to get images: find in the stores, or pull (docs/contracts.md).

Lookup order for a tag: the user store, then the site store. A digest (``name@sha256:…`` or a
bare ``sha256:…``) matches an image with that manifest digest in either store, whatever name
it was pulled under, or an index digest it was pulled by. ``find_image`` never touches the
network.
"""

from __future__ import annotations

import re
from pathlib import Path

from berth.errors import BerthError, NotFound, ReferenceError_
from berth.oci.digest import Digest
from berth.oci.reference import InvalidReference, Reference
from berth.record import Record, field
from berth.store.store import SITE, USER, Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from berth.config.settings import Settings
    from berth.image.progress import PullProgress

_BARE_DIGEST = re.compile(r"(sha256:)?([a-f0-9]{12,64})")


class StoredImage(Record):
    """An image complete in a store: its SquashFS and the JSON it came with."""

    digest: Digest
    reference: str | None
    squashfs: Path
    config: dict
    manifest: dict
    store: str
    size_bytes: int
    #: berth's metadata.json of the image (source, platform, index_digest, media_type, flatten).
    meta: dict = field(default_factory=dict, compare=False)


def stores(settings: "Settings") -> list[Store]:
    """The stores in lookup order: user, then site."""
    return [store_for(settings, site=False), store_for(settings, site=True)]


def store_for(settings: "Settings", *, site: bool) -> Store:
    if site:
        return Store(settings.site_store, SITE, lock_timeout_s=settings.lock_timeout_s)
    return Store(settings.user_store, USER, lock_timeout_s=settings.lock_timeout_s)


def index_key(reference: Reference) -> str:
    """The index.json key of a reference: ``name:tag``, or ``name@digest`` when pinned."""
    if reference.digest is not None:
        return f"{reference.name}@{reference.digest}"
    return str(reference)


def parse_reference(text: str) -> Reference:
    """Parse an image reference or raise ReferenceError_ (exit 2) saying what is wrong."""
    try:
        return Reference.parse(text)
    except InvalidReference as exc:
        raise ReferenceError_(
            str(exc),
            hint="write references as [HOST[:PORT]/]NAME[:TAG] or NAME@sha256:DIGEST, e.g. "
            "busybox:1.36 or 127.0.0.1:5000/team/app@sha256:…",
        ) from None


def load_stored(store: Store, digest: Digest, reference: str | None) -> StoredImage:
    """A StoredImage for a complete image of ``store`` (raises StoreError if unreadable)."""
    manifest, config, meta = store.load_image_files(digest)
    squashfs = store.layout.image_squashfs(digest)
    try:
        size = squashfs.stat().st_size
    except OSError:
        size = int(meta.get("squashfs_bytes") or 0)
    return StoredImage(digest=digest, reference=reference, squashfs=squashfs, config=config,
                       manifest=manifest, store=store.kind, size_bytes=size, meta=meta)


def find_in_store(store: Store, ref: str) -> StoredImage | None:
    """Look ``ref`` up in one store (no network); None when absent. Raises ReferenceError_."""
    if not store.exists():
        return None
    bare = _BARE_DIGEST.fullmatch(ref)
    if bare:
        # Like docker: a hex string is an image id (digest prefix) first, a name second.
        found = _find_by_digest_prefix(store, bare.group(2))
        if found is not None or bare.group(1):
            return found
    reference = parse_reference(ref)
    references = store.read_index()
    if reference.digest is not None:
        if store.has_image(reference.digest):
            return load_stored(store, reference.digest, index_key(reference))
        # Pulled by an index digest: the index maps it to the platform's manifest.
        target = references.get(index_key(reference))
        if target and store.has_image(Digest.parse(target)):
            return load_stored(store, Digest.parse(target), index_key(reference))
        by_index = _find_by_index_digest(store, reference.digest)
        return load_stored(store, by_index, index_key(reference)) if by_index else None
    target = references.get(index_key(reference))
    if target is None:
        return None
    digest = Digest.parse(target)
    if not store.has_image(digest):
        return None
    return load_stored(store, digest, index_key(reference))


def _find_by_index_digest(store: Store, index_digest: Digest) -> Digest | None:
    """The stored image pulled from image index ``index_digest`` (this machine's platform
    first when several platforms of it are stored)."""
    from berth.image.platforms import default_platform

    matches: list[tuple[bool, Digest]] = []
    for digest in store.list_images():
        try:
            _manifest, _config, meta = store.load_image_files(digest)
        except BerthError:
            continue
        if meta.get("index_digest") == str(index_digest):
            matches.append((meta.get("platform") != str(default_platform()), digest))
    return min(matches)[1] if matches else None


def _find_by_digest_prefix(store: Store, hex_prefix: str) -> StoredImage | None:
    matches = [d for d in store.list_images() if d.hex.startswith(hex_prefix)]
    if not matches:
        return None
    if len(matches) > 1:
        raise ReferenceError_(
            f"digest prefix '{hex_prefix}' matches {len(matches)} images in the {store.kind} store",
            hint="give more digits of the digest (see `berth images --no-trunc` or `berth images --json`)",
        )
    return load_stored(store, matches[0], None)


def find_image(settings: "Settings", ref: str) -> StoredImage | None:
    """The image ``ref`` names, from the user store then the site store; None when neither
    has it. Never touches the network. Raises ReferenceError_ for a bad reference."""
    for store in stores(settings):
        found = find_in_store(store, ref)
        if found is not None:
            return found
    return None


def get_image(settings: "Settings", ref: str, *, pull_missing: bool = True,
              progress: "PullProgress | None" = None) -> StoredImage:
    """Find ``ref``; when absent pull it into the user store (``pull_missing``), else raise
    NotFound naming both stores."""
    found = find_image(settings, ref)
    if found is not None:
        return found
    if not pull_missing:
        raise NotFound(
            f"image '{ref}' is not in your store ({settings.user_store}) nor in the site store "
            f"({settings.site_store})",
            hint=f"pull it with `berth pull {ref}`, or ask your site administrator to add it "
            "to the site store",
        )
    return pull(settings, ref, progress=progress)


#: How often a node waiting for another node's pull looks at the stores: from the first value,
#: doubling to the last (10,000 waiting nodes then read the store index ~2,000 times a second,
#: and take no lock).
WAIT_POLL_S = (0.2, 5.0)
#: A recorded step pull failure older than the waiter's start by more than this is an earlier
#: job's (Slurm ids restart when a cluster is rebuilt); it allows for clocks of nodes that differ.
STEP_FAILURE_SLACK_S = 60.0


def pull_for_step(settings: "Settings", ref: str, *, step: str) -> StoredImage:
    """Pull ``ref`` for the Slurm step ``step`` (``JOB.STEP``) as its node 0; on failure record
    the reason in the user store for the step's waiting nodes, then raise it."""
    try:
        return pull(settings, ref)
    except BerthError as error:
        store_for(settings, site=False).record_step_pull_failure(step, error.message)
        raise


def wait_for_image(settings: "Settings", ref: str, *, step: str, timeout_s: float | None = None,
                   sleep=None, clock=None, wall_clock=None) -> StoredImage:
    """Wait until node 0 of the Slurm step ``step`` has put ``ref`` into a store, reading the
    stores without locking them; at most ``timeout_s`` (default: the settings'
    ``lock_timeout_s``, how long berth would wait for the store's lock that the pull holds).
    Raises NotFound when node 0 recorded that its pull failed, or when the image does not
    appear in time."""
    import time

    sleep, clock, wall_clock = sleep or time.sleep, clock or time.monotonic, wall_clock or time.time
    puller = f"node 0 of Slurm step {step}"
    limit = float(settings.lock_timeout_s if timeout_s is None else timeout_s)
    deadline = clock() + limit
    since = wall_clock() - STEP_FAILURE_SLACK_S
    user_store = store_for(settings, site=False)
    pause = WAIT_POLL_S[0]
    while True:
        found = find_image(settings, ref)
        if found is not None:
            return found
        failure = user_store.step_pull_failure(step, since)
        if failure is not None:
            raise NotFound(f"image '{ref}' is in no store and {puller} could not pull it: {failure}",
                           hint=f"node 0's output has the details; pull the image before the step "
                           f"(`berth pull {ref}`)")
        left = deadline - clock()
        if left <= 0:
            raise NotFound(
                f"image '{ref}' did not appear in your store ({settings.user_store}) or the site store "
                f"within {limit:g} s while {puller} pulled it",
                hint=f"{puller}'s output says why; pull the image before the step (`berth pull {ref}`), or "
                "raise lock_timeout_s (BERTH_LOCK_TIMEOUT_S) for a large image",
            )
        sleep(min(pause, left))
        pause = min(pause * 2, WAIT_POLL_S[1])


def pull(settings: "Settings", ref: str, *, site: bool = False, platform: str | None = None,
         progress: "PullProgress | None" = None) -> StoredImage:
    """Pull ``ref`` into the user store (or the site store with ``site``) and return it.

    Raises ReferenceError_, PolicyError (untrusted registry), PermissionDenied (store not
    writable), AuthenticationError, RegistryUnreachable, ManifestUnknown, PlatformNotFound,
    DigestMismatch, StoreError (disk full), ImageError (layers refused by the flattener).
    """
    from berth.image.pull import pull_image

    return pull_image(settings, ref, site=site, platform=platform, progress=progress).image
