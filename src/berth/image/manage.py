"""Listing, inspecting and removing stored images (``berth images``, ``inspect``, ``rmi``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from berth.errors import BerthError, NotFound, PermissionDenied
from berth.image.api import StoredImage, find_image, find_in_store, store_for, stores
from berth.oci.digest import Digest
from berth.oci.reference import InvalidReference, Reference
from berth.record import Record
from berth.store.store import SITE, Store

if TYPE_CHECKING:
    from berth.config.settings import Settings


class ImageRow(Record):
    """One line of ``berth images``: a reference (or none) naming a stored image."""

    repository: str
    tag: str | None
    digest: Digest
    size_bytes: int
    store: str
    reference: str | None

    def to_json(self) -> dict:
        return {"repository": self.repository, "tag": self.tag, "digest": str(self.digest),
                "size_bytes": self.size_bytes, "store": self.store, "reference": self.reference}


class ImageListing(Record):
    rows: list[ImageRow]
    #: Stores that could not be read, with why (the listing shows the others).
    notes: list[str]


def list_images(settings: "Settings") -> ImageListing:
    """Every tagged image of the user store, then of the site store (no network, no locks).

    A store that does not exist lists nothing; one this user cannot read is skipped with a note.
    """
    rows: list[ImageRow] = []
    notes: list[str] = []
    for store in stores(settings):
        if not store.exists():
            continue
        try:
            references = store.read_index()
        except PermissionDenied as error:
            notes.append(f"{error.message} ({error.hint})")
            continue
        sizes: dict[str, int] = {}
        for key, target in sorted(references.items()):
            digest = Digest.parse(target)
            if not store.has_image(digest):
                continue
            if target not in sizes:
                try:
                    sizes[target] = store.layout.image_squashfs(digest).stat().st_size
                except OSError:
                    sizes[target] = 0
            repository, tag = split_key(key)
            rows.append(ImageRow(repository, tag, digest, sizes[target], store.kind, key))
    return ImageListing(rows, notes)


def split_key(key: str) -> tuple[str, str | None]:
    """(repository, tag or None) of an index key (``name:tag`` or ``name@digest``)."""
    try:
        reference = Reference.parse(key)
    except InvalidReference:
        return key, None
    return reference.name, reference.tag


def inspect_image(settings: "Settings", ref: str) -> dict:
    """Everything known about a stored image as JSON-ready data; raises NotFound."""
    image = require_image(settings, ref)
    store = store_for(settings, site=image.store == SITE)
    meta = image.meta
    references = sorted(k for k, v in store.read_index().items() if v == str(image.digest))
    layers = [
        {"digest": d.get("digest"), "size_bytes": d.get("size"), "media_type": d.get("mediaType")}
        for d in image.manifest.get("layers") or []
    ]
    return {
        "reference": image.reference,
        "digest": str(image.digest),
        "references": references,
        "store": image.store,
        "store_path": str(store.root),
        "squashfs": str(image.squashfs),
        "squashfs_bytes": image.size_bytes,
        "layers": layers,
        "layers_bytes": sum(int(layer["size_bytes"] or 0) for layer in layers),
        "config": image.config,
        "manifest": image.manifest,
        "platform": meta.get("platform"),
        "index_digest": meta.get("index_digest"),
        "source": meta.get("source"),
        "created": meta.get("created"),
        "compression": meta.get("compression"),
        "flatten": meta.get("flatten"),
    }


def require_image(settings: "Settings", ref: str) -> StoredImage:
    """The stored image ``ref`` names (:func:`berth.image.api.find_image`: user store, then
    site store; no network). Raises NotFound naming both stores, or ReferenceError_."""
    found = find_image(settings, ref)
    if found is not None:
        return found
    raise NotFound(
        f"image '{ref}' is not in your store ({settings.user_store}) nor in the site store "
        f"({settings.site_store})",
        hint=f"see `berth images` for what is there, or pull it with `berth pull {ref}`",
    )


class RemoveResult(Record):
    untagged: list[str]
    removed_digest: Digest | None
    bytes_freed: int
    store: str


def remove_image(settings: "Settings", ref: str, *, site: bool = False, force: bool = False) -> RemoveResult:
    """Untag ``ref`` in one store; remove the image when no reference to it remains.

    A tag removes that tag only. A digest (``name@sha256:…`` or bare ``sha256:…``) removes
    every reference to the image, then the image. Blobs stay until ``prune``. In the site store
    an image a template pins is neither removed nor untagged of its pinned reference (which
    keeps it from ``prune``) unless ``force``: PolicyError naming the templates (every job of
    theirs would fail). Raises NotFound (saying when the other store has it), PermissionDenied
    (site store without rights), ConfigError (a template file that cannot be read: whether it
    pins the image cannot be told).
    """
    store = store_for(settings, site=site)
    image = find_in_store(store, ref)
    if image is None:
        other = store_for(settings, site=not site)
        hint = "see `berth images`"
        if find_in_store(other, ref) is not None:
            hint = ("it is in the site store: only administrators remove it, with --site"
                    if not site else "it is in your own store: run the command without --site")
        raise NotFound(f"image '{ref}' is not in the {store.kind} store ({store.root})", hint=hint)
    digest = image.digest
    by_digest = image.reference is None or "@" in image.reference
    untagged: list[str] = []
    freed = 0
    removed = None
    def goes(key: str, references: dict[str, str]) -> bool:
        return key == image.reference or (by_digest and references[key] == str(digest))

    with store.writing(), store.image_lock(digest):
        if store.kind == SITE and not force:
            references = store.read_index()
            doomed = {key for key in references if goes(key, references)}
            _refuse_pinned(settings, ref, digest, doomed,
                           removed=all(key in doomed for key, value in references.items() if value == str(digest)))

        def change(references: dict[str, str]) -> None:
            for key in list(references):
                if goes(key, references):
                    del references[key]
                    untagged.append(key)

        remaining = store.update_index(change)
        if str(digest) not in remaining.values():
            freed = store.remove_image(digest)
            removed = digest
    return RemoveResult(sorted(untagged), removed, freed, store.kind)


def _refuse_pinned(settings: "Settings", ref: str, digest: Digest, untagged: set[str], *, removed: bool) -> None:
    """PolicyError when a template pins image ``digest`` and the removal would delete it
    (``removed``) or untag the reference it is pinned by (``untagged``)."""
    from berth.config.templates import list_templates
    from berth.errors import ConfigError, PolicyError
    from berth.image.api import index_key, parse_reference

    try:
        templates = list_templates(settings)
    except ConfigError as error:
        raise ConfigError(f"cannot tell whether a template pins image {ref}: {error.message}",
                          hint="fix the template (berth config check), or remove the image anyway "
                               "with --force") from None
    pinning = sorted(template.name for template in templates if template.image_digest == str(digest)
                     and (removed or index_key(parse_reference(template.pinned_reference)) in untagged))
    if pinning:
        names = ", ".join(f"'{name}'" for name in pinning)
        raise PolicyError(f"image {ref} ({digest}) is pinned by template{'s' if len(pinning) > 1 else ''} "
                          f"{names}: every job of {'theirs' if len(pinning) > 1 else 'its'} would fail",
                          hint="pin another image first (berth template modify NAME image=REF, or "
                               "berth template delete NAME), or remove it anyway with --force")


def prune_store(settings: "Settings", *, site: bool = False):
    """Prune one store (see Store.prune); returns its PruneReport."""
    store: Store = store_for(settings, site=site)
    if not store.exists():
        from berth.store.store import PruneReport

        return PruneReport()
    return store.prune()


def verify_store(settings: "Settings", *, site: bool = False, repair: bool = False,
                 insecure: bool = False):
    """Verify one store (berth.store.verify); with ``repair`` also fetch again what the
    removal of damaged content left missing: layers of intact images, and the images of
    references whose image was removed (pulled again: blobs still stored are not fetched).

    Returns the VerifyReport; problems that could not be repaired stay in ``remaining`` with
    the reason added to their detail. Raises PermissionDenied (repairing a store this user
    cannot write), StoreError.
    """
    from berth.store.verify import verify_store as verify

    store: Store = store_for(settings, site=site)
    report = verify(store, repair=repair)
    if not repair:
        return report
    for need in report.refetch_blobs:
        try:
            _refetch_blob(settings, store, need, insecure)
        except BerthError as error:
            need.problem.detail += f"; fetching it again failed: {error.message}"
            continue
        need.problem.repaired = f"fetched again from {need.source}"
    for key, problem in report.refetch_references.items():
        target = store.read_index().get(key)
        meta = report.removed_meta.get(target or "", {})
        try:
            problem.repaired = _restore_reference(settings, store, key, target, meta, insecure)
        except BerthError as error:
            problem.detail += f"; restoring it failed: {error.message}"
    return report


def _restore_reference(settings: "Settings", store: Store, key: str, target: str | None,
                       meta: dict, insecure: bool) -> str:
    """Make reference ``key`` name a complete image again: convert it from the blobs still
    stored (no network), else pull it (only what is missing is downloaded)."""
    from berth.image.install import install_image, parse_image_manifest
    from berth.image.pull import pull_image

    digest = Digest.parse(target) if target else None
    if digest is not None and store.has_blob(digest):
        manifest_bytes = store.read_blob(digest)
        _manifest, config, layers = parse_image_manifest(manifest_bytes, key)
        if all(store.has_blob(d.digest) for d in [config, *layers]):
            kept = {k: meta[k] for k in ("source", "repository", "index_digest", "platform",
                                         "media_type", "imported_from") if k in meta}
            with store.writing():
                install_image(store, digest, manifest_bytes=manifest_bytes,
                              config_bytes=store.read_blob(config.digest), layers=layers,
                              reference_key=key, compression=settings.squashfs_compression,
                              meta=kept or {"source": key})
            return "converted again from the stored blobs"
    if meta.get("imported_from"):
        raise NotFound(f"'{key}' was imported from {meta.get('source')}, and its blobs are gone: "
                       "import it again")
    pull_image(settings, key, site=store.kind == SITE, insecure=insecure)
    return "pulled again"


def _refetch_blob(settings: "Settings", store: Store, need, insecure: bool) -> None:
    from berth.image.api import parse_reference
    from berth.image.install import Descriptor
    from berth.image.pull import StopSignal, check_registry_policy, fetch_blob, make_client

    if not need.source:
        raise NotFound("the image does not record where it came from")
    try:
        reference = parse_reference(need.source)
    except BerthError:
        raise NotFound(f"the image came from '{need.source}', not a registry: import it again") from None
    check_registry_policy(settings, reference)
    client = make_client(settings, reference, insecure=insecure)
    try:
        with store.writing():
            fetch_blob(client, store, reference, Descriptor(need.media_type, need.digest, need.size_bytes),
                       client.retry, None, StopSignal())
    finally:
        client.close()
