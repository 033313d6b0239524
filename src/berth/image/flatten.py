"""Flatten an image's layers into one SquashFS file, safely and in one streaming pass.

Contract (docs/contracts.md, "berth.image.flatten"): :func:`build_squashfs` applies the layers
bottom to top with OCI whiteout semantics and writes one SquashFS; :func:`tar_to_squashfs`
does the same for one plain rootfs tarball. Image content never touches the host filesystem:
each layer is decompressed into a pipe, parsed as a tar stream, and the surviving entries are
written as one new PAX tar stream into ``tar2sqfs``, which builds the image in memory.

How (the why is in each rule's comment):

* Layers are read **top layer first**. What an upper layer put in the tree is final, so an
  entry of a lower layer survives only when nothing above hid it:
  - a path already placed by an upper layer hides the same path below (a directory placed
    above keeps its own metadata; a directory *implied* above by a child gets the metadata of
    the first lower layer that has the directory itself);
  - a non-directory placed above hides everything under that path below;
  - ``.wh.NAME`` in layer i hides NAME and its subtree in layers below i (not in layer i);
  - ``.wh..wh..opq`` in directory D of layer i hides everything under D in layers below i,
    but not D itself nor D's entries from layer i;
  - whiteout entries are never emitted; other ``.wh..wh.*`` (AUFS metadata) are dropped.
* Within one layer a later entry for a path replaces an earlier one, and a later non-directory
  replaces an earlier directory with its subtree (tar semantics, what ``umoci unpack`` does).
  A stream cannot take back what it sent, so the pass watches for this; when a layer turns
  out to have such duplicates the conversion restarts once with a pre-scan of that layer that
  says which occurrence of each path is the last (:class:`_LayerPlan`). Real images rarely
  need it, so the common case stays one pass.
* Safety, for hostile images (berth never creates any of this on the host; the SquashFS is
  mounted nosuid,nodev by squashfuse):
  - names are made canonical: leading '/' and './' and empty or '.' components go away;
    a name with a '..' component is dropped with a note (it could only mean "outside");
  - an entry under a non-directory placed earlier by the same layer (``a -> /etc`` then
    ``a/passwd``) is dropped with a note, whatever upper layers put at ``a``; under a
    non-directory placed by an upper layer it is hidden, as overlay semantics say; a lower
    layer's non-directory where an upper layer has a directory is dropped with a note;
  - a hard link is kept when its target is a regular file of the final tree that is the very
    file the link named when its layer was applied (the latest earlier entry of that path in
    the same layer, or a file of a lower layer that nothing above replaced). When that file is
    hidden in the final tree (whited out or replaced above, or replaced later in its layer),
    its data is written under the first surviving link's name and the other links point there
    (materialized, with a note; this needs the layer's pre-scan, as for duplicates). Links whose
    target is outside the tree, missing, not a regular file, or a lower layer's file that an
    upper layer replaced are dropped with a note. Hard links are written at the end of the
    stream, when the final tree is known, and always name a path inside the tree;
  - symlink targets are kept verbatim: they are resolved only inside the container;
  - device nodes, FIFOs, setuid/setgid/sticky bits, numeric ownership (names ignored) and
    xattrs (``SCHILY.xattr.*`` in the user, trusted and security namespaces; others are
    dropped with a note, SquashFS cannot hold them) are kept in the SquashFS metadata;
  - sparse members, entries that would make the image exceed ``max_content_bytes``, more
    than ``max_entries`` members, absurdly long names, owners beyond 32 bits (tar2sqfs would
    truncate uid 2**32 to 0), impossible device numbers, pax/GNU extension headers over
    1 MiB, unknown entry types, and truncated or corrupt layers raise :class:`ImageError`
    naming the layer and the entry. Control characters in names are escaped in notes.

Speed (measured on the 2-core test machine, debian test image, 204 MB rootfs, 7353 entries):
decompression runs in its own process (igzip, else pigz), member data is spliced pipe to pipe
by the kernel, headers are parsed by a tarfile-identical fast path (tarstream.py), and
tar2sqfs compresses with two threads; the three processes overlap. See squashfs.py for the
compression levels.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

from berth.errors import ImageError
from berth.image import tarstream
from berth.image.squashfs import DEFAULT_COMPRESSION, SquashfsWriter, check_compression
from berth.oci.digest import Digest
from berth.record import Record, field

#: Default limit on the expanded size of an image's regular files (64 GiB).
DEFAULT_MAX_CONTENT_BYTES = 64 << 30
#: Default limit on tar members read over all layers (a tar bomb of empty files would
#: otherwise grow tar2sqfs' in-memory tree without bound).
DEFAULT_MAX_ENTRIES = 5_000_000
#: Notes beyond this many are counted, not listed (a hostile layer can make millions).
MAX_NOTES = 10_000

_DIR_KINDS = ("dir", "implied")
_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}
_MAX_ID = 2**32 - 1
_MAX_DEV_MAJOR = 1 << 12
_MAX_DEV_MINOR = 1 << 20
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"


class Layer(Record):
    """One layer blob on disk: gzip, zstd or plain tar (detected from its magic bytes).

    ``wait_until_stored(digest)``, when given, is called before the blob is opened: a pull
    passes one that returns once the download is verified and stored, so conversion of upper
    layers overlaps the download of lower ones; it raises to abort the conversion.

    ``follow(digest)``, when given, is tried first: a context manager that yields the blob's
    bytes as they download (first bytes, pipe), or None when it cannot (then the blob is
    waited for and read from ``path``). It must raise :class:`StreamUnusable` on leaving when
    what went through the pipe was not exactly the verified blob (the conversion then starts
    again from the stored blob), and the download's own failure rather than the conversion's
    when the download failed. When the conversion failed on what went through and that is
    the beginning of the verified blob, it lets the failure stand: the stored blob would be
    refused again (a hostile layer is refused once). Issue 10: a single-layer image converts
    while it downloads."""

    path: Path
    media_type: str
    digest: Digest
    wait_until_stored: Callable[[Digest], None] | None = field(default=None, compare=False)
    follow: Callable[[Digest], AbstractContextManager[tuple[bytes, BinaryIO] | None]] | None = field(
        default=None, compare=False)


class StreamUnusable(Exception):
    """The bytes a layer was converted from while it downloaded are not the verified blob
    (the download restarted, or stopped): convert that layer again from the stored blob."""

    def __init__(self, digest: Digest) -> None:
        super().__init__(str(digest))
        self.digest = digest


class FlattenReport(Record, frozen=False):
    """What the conversion produced: entries written, bytes of file content, and one note
    for every entry dropped or changed (with the layer it came from)."""

    entries: int = 0
    content_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    notes_omitted: int = 0

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        else:
            self.notes_omitted += 1


class _Node(Record, frozen=False):
    """A path of the final tree: which layer placed it, at which member index, as what."""

    __slots__ = ("layer", "index", "kind")  # one per path of the image: no __dict__ each

    layer: int
    index: int
    kind: str

    def __init__(self, layer: int, index: int, kind: str) -> None:
        # Its own: one per path of the image, and Record's generic __init__ costs ~1.3 us more.
        self.layer, self.index, self.kind = layer, index, kind


class _LayerPlan(Record):
    """Pre-scan of one layer: the index of the last member for each path, and of the last
    non-directory member (which replaces a directory placed earlier with its subtree)."""

    last_index: dict[str, int]
    last_nondir_index: dict[str, int]
    #: member index of a regular file → (index, path) of the hard links of this layer naming it
    link_sources: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


class _NeedPlan(Exception):
    def __init__(self, layer: int) -> None:
        super().__init__(layer)
        self.layer = layer


class _PendingLink(Record):
    path: str
    header: tarfile.TarInfo
    layer: int
    what: str
    #: (layer, member index, path) of the file the link named, or None for "a lower layer's".
    source: tuple[int, int, str] | None
    target: str


class _Limits:
    def __init__(self, max_content_bytes: int, max_entries: int) -> None:
        self.max_content_bytes = max_content_bytes
        self.max_entries = max_entries
        self.members = 0


def _ancestors(path: str) -> list[str]:
    """'a/b/c' → ['a', 'a/b'] (the proper ancestors, root excluded, shallow first)."""
    if "/" not in path:
        return []
    parts = path.split("/")
    found = [parts[0]]
    for part in parts[1:-1]:
        found.append(found[-1] + "/" + part)
    return found


class _Flattener:
    """The top-down overlay state and the output stream."""

    def __init__(self, sink: tarstream.ByteSink, report: FlattenReport, limits: _Limits) -> None:
        self.sink = sink
        self.report = report
        self.limits = limits
        self.nodes: dict[str, _Node] = {}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.links: list[_PendingLink] = []
        self.opaque_implied: list[str] = []
        #: (layer, index of a hidden regular file) → (layer, index, path) of the hard link of
        #: the same layer that now carries its data; and the (layer, index) of such links.
        self.materialized: dict[tuple[int, int], tuple[int, int, str]] = {}
        self.materialized_links: set[tuple[int, int]] = set()

    # -- one layer -------------------------------------------------------------------------
    def layer(self, source: tarstream.ByteSource, layer: int, what: str, plan: _LayerPlan | None) -> None:
        pending_whiteouts: set[str] = set()
        pending_opaque: set[str] = set()
        # Latest member per path in this layer: (index, kind, source of a hard link).
        seen: dict[str, tuple[int, str, tuple[int, int, str] | None]] = {}
        last = "(the first entry)"
        try:
            for index, info in _members(source, what, self.limits):
                last = info.name
                self._member(index, info, source, layer, what, plan, seen,
                             pending_whiteouts, pending_opaque)
        except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
            raise ImageError(
                f"{what} is truncated or corrupt after entry '{_shown(last[:200])}': {exc}",
                hint="the layer blob is damaged; remove it from the store and pull again",
            ) from None
        self.whiteouts |= pending_whiteouts
        self.opaque |= pending_opaque

    def _member(self, index: int, info: tarfile.TarInfo, source: tarstream.ByteSource, layer: int,
                what: str, plan: _LayerPlan | None, seen: dict, pending_whiteouts: set[str],
                pending_opaque: set[str]) -> None:
        kind = _kind(info, what)  # first: it refuses absurd names before any note quotes them
        try:
            path = tarstream.canonical_name(info.name)
        except tarstream.NameRejected:
            self.report.note(f"{what}: dropped '{_shown(info.name)}': a '..' component points outside the image")
            return
        base = path.rpartition("/")[2]
        if _WHITEOUT_PREFIX in path and "/" + _WHITEOUT_PREFIX in "/" + path[:len(path) - len(base)]:
            self.report.note(f"{what}: dropped '{_shown(path)}': it lies under a whiteout name (AUFS metadata)")
            return
        if base.startswith(_WHITEOUT_PREFIX):
            self._whiteout(path, base, layer, index, what, pending_whiteouts, pending_opaque)
            return
        if kind == "hardlink":
            link_source = self._link_source(info, path, layer, what, seen)
            seen[path] = (index, kind, link_source)
            if (layer, index) in self.materialized_links:
                return  # already written, as the file its hidden target was
        else:
            link_source = None
            seen[path] = (index, kind, None)
        # The ancestors once per member, for the three checks below (issue 10: the hot loop).
        ancestors = _ancestors(path)
        if not self._placeable_in_layer(path, index, plan, what, seen, ancestors=ancestors) \
                or not self._place(path, kind, layer, index, what, plan, ancestors=ancestors):
            if kind == "file" and plan is not None and index in plan.link_sources:
                self._materialize(info, path, layer, index, plan, seen, source, what)
            return
        if kind == "hardlink":
            if link_source is not None and link_source[0] == -1:
                return  # already noted: the target can never be valid
            if link_source is not None and link_source[0] == layer:
                target = self.nodes.get(link_source[2])
                if target is None or (target.layer, target.index, target.kind) != (layer, link_source[1], "file"):
                    # The file this link names is hidden in the final tree (whited out or
                    # replaced above, or replaced later in this layer): its data must be
                    # written under the link's name, which needs a pre-scan of this layer.
                    moved = self.materialized.get((layer, link_source[1]))
                    if moved is not None:
                        link_source = moved
                    elif plan is None:
                        raise _NeedPlan(layer)
            self.links.append(_PendingLink(path, info, layer, what,
                                           link_source, info.linkname))
            return
        self._emit(path, info, kind, source, what)

    def _placeable_in_layer(self, path: str, index: int, plan: _LayerPlan | None, what: str,
                            seen: dict, *, quiet: bool = False, ancestors: list[str] | None = None) -> bool:
        """The checks of one layer's own order: superseded by a later entry, or under a
        non-directory placed earlier by the same layer. ``ancestors``: ``_ancestors(path)``
        when the caller has it."""
        if plan is not None and not self._last_in_layer(path, index, plan, what, quiet=quiet):
            return False
        for ancestor in _ancestors(path) if ancestors is None else ancestors:
            # Under a non-directory of this very layer (``a -> /etc`` then ``a/passwd``): a
            # write through a link, whatever upper layers later put at that path.
            earlier = seen.get(ancestor)
            if earlier is not None and earlier[1] not in _DIR_KINDS:
                if not quiet:
                    self.report.note(f"{what}: dropped '{_shown(path)}': its parent '{_shown(ancestor)}' is a {earlier[1]} "
                                     "of the same layer")
                return False
        return True

    def _materialize(self, info: tarfile.TarInfo, path: str, layer: int, index: int, plan: _LayerPlan,
                     seen: dict, source: tarstream.ByteSource, what: str) -> None:
        """Write a hidden regular file's data under the first of its hard links that will be
        in the final tree, so the links keep the content ``umoci unpack`` would give them."""
        for link_index, link_path in plan.link_sources[index]:
            if not self._placeable_in_layer(link_path, link_index, plan, what, seen, quiet=True) \
                    or self._blocked(link_path, layer) is not None or link_path in self.nodes:
                continue
            self.nodes[link_path] = _Node(layer, link_index, "file")
            for ancestor in _ancestors(link_path):
                self.nodes.setdefault(ancestor, _Node(layer, link_index, "implied"))
            self.materialized[(layer, index)] = (layer, link_index, link_path)
            self.materialized_links.add((layer, link_index))
            self.report.note(f"{what}: hard link '{_shown(link_path)}' became a copy of '{_shown(path)}', which is hidden "
                             "in the final tree")
            self._emit(link_path, info, "file", source, what)
            return

    def _whiteout(self, path: str, base: str, layer: int, index: int, what: str,
                  pending_whiteouts: set[str], pending_opaque: set[str]) -> None:
        parent = path.rpartition("/")[0]
        if base == _OPAQUE_MARKER:
            pending_opaque.add(parent)
            # The marker says D is a directory of this layer: it exists even when nothing
            # else of this layer is under it.
            if parent and self._blocked(parent, layer) is None and parent not in self.nodes:
                self.nodes[parent] = _Node(layer, index, "implied")
                for ancestor in _ancestors(parent):
                    self.nodes.setdefault(ancestor, _Node(layer, index, "implied"))
                self.opaque_implied.append(parent)
            return
        name = base[len(_WHITEOUT_PREFIX):]
        if not name or name.startswith(_WHITEOUT_PREFIX):
            self.report.note(f"{what}: ignored '{_shown(path)}': not a whiteout this flattener applies")
            return
        pending_whiteouts.add(f"{parent}/{name}" if parent else name)

    def _link_source(self, info: tarfile.TarInfo, path: str, layer: int, what: str,
                     seen: dict) -> tuple[int, int, str] | None:
        """What a hard link names: (layer, index, path) of a regular file of this layer,
        None for "whatever a lower layer has there", or (-1, -1, reason) when invalid."""
        try:
            target = tarstream.canonical_name(info.linkname)
        except tarstream.NameRejected:
            self.report.note(f"{what}: dropped hard link '{_shown(path)}': its target '{_shown(info.linkname)}' is outside the image")
            return (-1, -1, "outside")
        info.linkname = target
        if not target or target == path:
            self.report.note(f"{what}: dropped hard link '{_shown(path)}': it names '{info.linkname or '/'}'")
            return (-1, -1, "self")
        previous = seen.get(target)
        if previous is None:
            return None
        index, kind, source = previous
        if kind == "file":
            return (layer, index, target)
        if kind == "hardlink":
            return source
        self.report.note(f"{what}: dropped hard link '{_shown(path)}': its target '{_shown(target)}' is a {kind}, not a regular file")
        return (-1, -1, "kind")

    def _last_in_layer(self, path: str, index: int, plan: _LayerPlan, what: str, *,
                       quiet: bool = False) -> bool:
        if plan.last_index.get(path, index) != index:
            if not quiet:
                self.report.note(f"{what}: skipped an earlier entry for '{_shown(path) or '/'}': a later entry of "
                                 "the same layer replaces it")
            return False
        for ancestor in _ancestors(path):
            if plan.last_nondir_index.get(ancestor, -1) > index:
                if not quiet:
                    self.report.note(f"{what}: skipped '{_shown(path)}': a later non-directory '{_shown(ancestor)}' of the "
                                     "same layer replaces its parent")
                return False
        return True

    def _blocked(self, path: str, layer: int, ancestors: list[str] | None = None) -> str | None:
        """None when ``path`` of ``layer`` can still be placed; else why not ('' = hidden by
        overlay semantics, no note). ``ancestors``: ``_ancestors(path)`` when the caller has it."""
        if "" in self.opaque:
            return ""
        whiteouts, opaque, nodes = self.whiteouts, self.opaque, self.nodes
        for ancestor in _ancestors(path) if ancestors is None else ancestors:
            if ancestor in whiteouts or ancestor in opaque:
                return ""
            node = nodes.get(ancestor)
            if node is not None and node.kind not in _DIR_KINDS:
                if node.layer == layer:
                    return f"its parent '{_shown(ancestor)}' is a {node.kind} of the same layer"
                return ""
        if path in whiteouts:
            return ""
        return None

    def _place(self, path: str, kind: str, layer: int, index: int, what: str,
               plan: _LayerPlan | None, *, ancestors: list[str] | None = None) -> bool:
        """Decide whether this member is part of the final tree; record it when it is."""
        if path == "":
            if kind != "dir":
                self.report.note(f"{what}: dropped a {kind} entry for the root directory")
                return False
        else:
            if ancestors is None:
                ancestors = _ancestors(path)
            reason = self._blocked(path, layer, ancestors)
            if reason is not None:
                if reason:
                    self.report.note(f"{what}: dropped '{_shown(path)}': {reason}")
                return False
        node = self.nodes.get(path)
        if node is not None:
            if node.layer == layer and not (node.kind == "implied" and kind == "dir"):
                if plan is not None:
                    raise ImageError(f"{what}: cannot order the entries for '{_shown(path)}'",
                                     hint="this is a bug in berth's flattener; report it with the image name")
                raise _NeedPlan(layer)
            if node.kind != "implied":
                return False  # an upper layer's entry wins
            if kind != "dir":
                self.report.note(f"{what}: dropped {kind} '{_shown(path)}': an upper layer has a directory there")
                return False
            node.layer, node.index, node.kind = layer, index, "dir"
            return True
        self.nodes[path] = _Node(layer, index, kind)
        if path:
            for ancestor in ancestors:  # set above: the path is not the root
                if ancestor not in self.nodes:
                    self.nodes[ancestor] = _Node(layer, index, "implied")
        return True

    def _emit(self, path: str, info: tarfile.TarInfo, kind: str, source: tarstream.ByteSource,
              what: str) -> None:
        xattrs, dropped = tarstream.member_xattrs(info)
        if dropped:
            self.report.note(f"{what}: '{_shown(path) or '/'}': dropped xattrs SquashFS cannot store: {', '.join(sorted(dropped))}")
        if kind == "file":
            limit = self.limits.max_content_bytes
            if self.report.content_bytes + info.size > limit:
                raise ImageError(
                    f"{what}: '{_shown(path)}' ({info.size} bytes) makes the image larger than the limit of "
                    f"{limit} bytes expanded",
                    hint="the image is too large or hostile; ask your site administrator to raise the limit "
                    "if it is genuine",
                )
            tarstream.write_output(self.sink, info, path, kind=tarfile.REGTYPE, xattrs=xattrs, data=source)
            self.report.content_bytes += info.size
        else:
            linkname = info.linkname if kind == "symlink" else ""
            tarstream.write_output(self.sink, info, path or ".", linkname=linkname, xattrs=xattrs)
        self.report.entries += 1

    # -- end of stream ---------------------------------------------------------------------
    def finish(self) -> None:
        """Write what needed the whole tree: hard links, directories only an opaque marker made."""
        resolved: dict[str, str] = {}
        nodes = self.nodes
        for link in sorted(self.links, key=lambda link: link.layer):
            source = link.source
            if source is not None:
                node = nodes.get(source[2])
                valid = node is not None and node.layer == source[0] and node.index == source[1] \
                    and node.kind == "file"
                target = source[2]
                why = "its target was replaced or removed by a later entry or layer"
            else:
                target = link.target
                node = nodes.get(target)
                if node is not None and node.kind == "hardlink" and node.layer < link.layer:
                    target = resolved.get(target, "")
                    node = nodes.get(target) if target else None
                valid = node is not None and node.layer < link.layer and node.kind == "file"
                why = "its target is missing or not a regular file of a lower layer"
            if not valid:
                self.report.note(f"{link.what}: dropped hard link '{_shown(link.path)}' -> '{_shown(link.target)}': {why}")
                continue
            resolved[link.path] = target
            tarstream.write_member(self.sink, tarstream.output_info(
                link.header, link.path, kind=tarfile.LNKTYPE, linkname=target))
            self.report.entries += 1
        for path in self.opaque_implied:
            node = nodes.get(path)
            if node is not None and node.kind == "implied":
                info = tarfile.TarInfo(path)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tarstream.write_member(self.sink, tarstream.output_info(info, path))
                node.kind = "dir"
                self.report.entries += 1


def _shown(name: str) -> str:
    """A member name as notes and errors show it: control characters (a hostile name could
    hold terminal escapes) and undecodable bytes escaped."""
    if name.isprintable():
        return name
    return name.encode("unicode_escape", "backslashreplace").decode("ascii")


def _kind(info: tarfile.TarInfo, what: str) -> str:
    if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
        raise ImageError(
            f"{what}: '{_shown(info.name[:200])}' is a sparse file, which berth refuses (a sparse member can "
            "expand to any size)",
            hint="rebuild the image without sparse files (tar without --sparse)",
        )
    kind = _KINDS.get(info.type)
    if kind is None:
        raise ImageError(
            f"{what}: '{_shown(info.name[:200])}' has the unknown tar entry type {info.type!r}",
            hint="the layer is corrupt or was made by an unusual tool; rebuild the image",
        )
    # SquashFS keeps 32-bit owners and Linux device numbers (12-bit major, 20-bit minor);
    # tar2sqfs would silently truncate larger ones (uid 2**32 would become root).
    if not (0 <= info.uid <= _MAX_ID and 0 <= info.gid <= _MAX_ID):
        raise ImageError(f"{what}: '{_shown(info.name[:200])}' has an impossible owner {info.uid}:{info.gid}",
                         hint="the layer is hostile or corrupt; do not use this image")
    if kind in ("character device", "block device") and not (
            0 <= info.devmajor < _MAX_DEV_MAJOR and 0 <= info.devminor < _MAX_DEV_MINOR):
        raise ImageError(f"{what}: '{_shown(info.name[:200])}' has an impossible device number "
                         f"{info.devmajor}:{info.devminor}",
                         hint="the layer is hostile or corrupt; do not use this image")
    for label, value in (("name", info.name), ("link target", info.linkname)):
        why = tarstream.check_name_length(value, components=label == "name")
        if why:
            raise ImageError(f"{what}: an entry's {label} is absurd: {why} ('{_shown(value[:80])}...')",
                             hint="the layer is hostile or corrupt; do not use this image")
    return kind


def _members(source: tarstream.ByteSource, what: str, limits: _Limits
             ) -> Iterator[tuple[int, tarfile.TarInfo]]:
    """Yield (index, header) for each member of a tar stream; its data can be copied from
    ``source`` before the next iteration, else it is skipped. Enforces the entry limit."""
    for index, info in enumerate(tarstream.iter_members(source)):
        limits.members += 1
        if limits.members > limits.max_entries:
            raise ImageError(
                f"{what}: more than {limits.max_entries} entries in the image",
                hint="the image is a tar bomb or far larger than berth expects; do not use it",
            )
        yield index, info


def _prescan(stream: tarstream.ByteSource, what: str, max_entries: int) -> _LayerPlan:
    last_index: dict[str, int] = {}
    last_nondir: dict[str, int] = {}
    link_sources: dict[int, list[tuple[int, str]]] = {}
    # path → member index of the regular file it names now (through hard links), or -1
    files: dict[str, int] = {}
    try:
        for index, info in _members(stream, what, _Limits(0, max_entries)):
            try:
                path = tarstream.canonical_name(info.name)
            except tarstream.NameRejected:
                continue
            last_index[path] = index
            if info.type != tarfile.DIRTYPE:
                last_nondir[path] = index
            if info.type in tarfile.REGULAR_TYPES:
                files[path] = index
            elif info.type == tarfile.LNKTYPE:
                try:
                    target = files.get(tarstream.canonical_name(info.linkname), -1)
                except tarstream.NameRejected:
                    target = -1
                files[path] = target
                if target >= 0:
                    link_sources.setdefault(target, []).append((index, path))
            else:
                files[path] = -1
    except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
        raise ImageError(f"{what} is truncated or corrupt: {exc}",
                         hint="the layer blob is damaged; remove it from the store and pull again") from None
    return _LayerPlan(last_index, last_nondir, link_sources)


#: Opens one layer's decompressed bytes; called again for a pre-scan or a restart.
_Opener = Callable[[], AbstractContextManager[tarstream.ByteSource]]


def _convert(openers: Sequence[_Opener], names: Sequence[str], output: Path,
             compression: str, plans: dict[int, _LayerPlan], max_content_bytes: int,
             max_entries: int) -> FlattenReport:
    report = FlattenReport()
    limits = _Limits(max_content_bytes, max_entries)
    with SquashfsWriter(output, compression=compression) as squashfs:
        sink = tarstream.ByteSink(fd=squashfs.stdin_fd)
        flattener = _Flattener(sink, report, limits)
        try:
            for layer in reversed(range(len(openers))):
                with openers[layer]() as stream:
                    flattener.layer(stream, layer, names[layer], plans.get(layer))
            flattener.finish()
            tarstream.end_archive(sink)
        except BrokenPipeError:
            squashfs.finish()  # raises ImageError with tar2sqfs' own words
            raise ImageError("tar2sqfs stopped reading its input", hint="tar2sqfs exited without an error "
                             "message: run the command again, and report it to berth's maintainers if it "
                             "happens again") from None
        squashfs.finish()
    return report


def _run(openers: Sequence[_Opener], names: Sequence[str], output: Path, compression: str,
         max_content_bytes: int, max_entries: int, rereadable: bool,
         retry_unusable_stream: bool = False) -> FlattenReport:
    """Convert; when a layer turns out to need a pre-scan (duplicates, hidden hard-link
    targets), pre-scan it and start again (at most once per layer); with
    ``retry_unusable_stream``, when a layer converted while it downloaded was not the verified
    blob, start again (each opener streams its layer once at most, then reads the stored blob)."""
    check_compression(compression)
    plans: dict[int, _LayerPlan] = {}
    while True:
        try:
            return _convert(openers, names, output, compression, plans, max_content_bytes, max_entries)
        except StreamUnusable:
            if not retry_unusable_stream:
                raise
        except _NeedPlan as need:
            if need.layer in plans or not rereadable:
                raise ImageError(
                    f"{names[need.layer]} has several entries for one path and cannot be read twice",
                    hint="pass the tarball as a file rather than a pipe",
                ) from None
            with openers[need.layer]() as stream:
                plans[need.layer] = _prescan(stream, names[need.layer], max_entries)


def build_squashfs(layers: Sequence[Layer], output: Path, *, compression: str = DEFAULT_COMPRESSION,
                   tmp_dir: Path | None = None, max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
                   max_entries: int = DEFAULT_MAX_ENTRIES) -> FlattenReport:
    """Flatten ``layers`` (bottom first, as in the manifest) into one SquashFS at ``output``.

    ``output`` is a temporary path the caller renames; it is overwritten, and removed on any
    failure. ``compression`` is one of lz4, zstd, gzip, xz. ``tmp_dir`` is accepted for the
    contract; nothing is written there (the conversion is a pure stream). Raises ImageError for
    hostile or broken layers (naming the layer digest and the entry), UsageError for an unknown
    compression, ProgramNotFound when tar2sqfs (or zstd for zstd layers) is missing, StoreError
    when ``output`` cannot be written (missing directory, no permission, disk full).
    """
    del tmp_dir
    names = [f"layer {layer.digest}" for layer in layers]
    #: Layers read from the stored blob only: each is streamed at most once (its first
    #: opening; a pre-scan or a restart reads the stored blob).
    stored_only: set[Digest] = set()

    def opener(layer: Layer, name: str) -> _Opener:
        @contextmanager
        def open_layer() -> Iterator[tarstream.ByteSource]:
            if layer.follow is not None and layer.digest not in stored_only:
                stored_only.add(layer.digest)
                with layer.follow(layer.digest) as stream:
                    if stream is not None:
                        with tarstream.open_decompressed(layer.path, name, stream=stream) as source:
                            yield source
                        return
            if layer.wait_until_stored is not None:
                layer.wait_until_stored(layer.digest)
            with tarstream.open_decompressed(layer.path, name) as source:
                yield source
        return open_layer

    openers = [opener(layer, name) for layer, name in zip(layers, names)]
    return _run(openers, names, Path(output), compression, max_content_bytes, max_entries, True,
                retry_unusable_stream=True)


def tar_to_squashfs(tar_stream: BinaryIO | Path, output: Path, *, compression: str = DEFAULT_COMPRESSION,
                    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
                    max_entries: int = DEFAULT_MAX_ENTRIES) -> FlattenReport:
    """Convert one rootfs tarball (plain, gzip, zstd or xz; a path or a binary stream) into a
    SquashFS at ``output`` with the same sanitizing as :func:`build_squashfs`.

    A stream must be plain tar or gzip; a path may be any supported compression. A pipe is read
    once; if it holds duplicate entries for a path that need a second pass, ImageError says so.
    """
    name = "the tarball"
    if isinstance(tar_stream, (str, Path)):
        path = Path(tar_stream)
        name = f"tarball {path.name}"
        return _run([lambda: tarstream.open_decompressed(path, name)], [name], Path(output),
                    compression, max_content_bytes, max_entries, True)
    stream = tar_stream
    try:
        seekable = stream.seekable()
        start = stream.tell() if seekable else 0
    except (AttributeError, OSError):
        seekable, start = False, 0
    # A pipe is read once, through a buffer that lets us peek at the magic bytes.
    once = None if seekable else (stream if hasattr(stream, "peek") else io.BufferedReader(stream))

    @contextmanager
    def open_stream():
        if once is None:
            stream.seek(start)
            head = stream.read(8)
            stream.seek(start)
            reader = stream
        else:
            head, reader = once.peek(8)[:8], once
        kind = tarstream.sniff_compression(head)
        if kind is None:
            yield tarstream.ByteSource(reader)
        elif kind == "gzip":
            yield tarstream.ByteSource(io.BufferedReader(tarstream.GzipReader(reader),
                                                         buffer_size=tarstream.COPY_CHUNK_BYTES))
        else:
            raise ImageError(f"{name} is {kind}-compressed; berth reads only plain or gzip tar from a stream",
                             hint="pass the tarball as a file, or decompress it first")

    return _run([open_stream], [name], Path(output), compression, max_content_bytes, max_entries, seekable)
