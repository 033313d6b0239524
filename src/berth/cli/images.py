"""CLI commands for images: pull, images, inspect, rmi, prune, push, import, export, store verify.

Verbs and options follow docker/podman. Every handler imports its machinery lazily, so that
``berth run`` does not pay for them. Results go to stdout (a table, or JSON with ``--json``);
progress and notes go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(sub) -> None:
    """Add this module's commands to the top-level subparsers."""
    pull = sub.add_parser(
        "pull", help="pull an image from a registry into your store (or the site store)",
        description="Download REF (NAME[:TAG] or NAME@sha256:DIGEST), verify every blob, and "
        "convert it to one SquashFS file in your store (--site: the site store, admins only). "
        "Pulling an image already stored only updates its tag.")
    pull.add_argument("reference", metavar="REF")
    _site_option(pull, "write the site store (administrators)")
    pull.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="platform to pick from a multi-platform image (default: this machine's)")
    pull.add_argument("--insecure", action="store_true",
                      help="talk plain HTTP to the registry for this pull (default: as configured)")
    _quiet_json(pull)
    pull.set_defaults(handler=run_pull)

    images = sub.add_parser("images", help="list stored images (your store and the site store)",
                            description="List the tagged images of your store and of the site store.")
    images.add_argument("--json", action="store_true", help="print JSON instead of a table")
    images.add_argument("--no-trunc", action="store_true", help="show full digests")
    images.set_defaults(handler=run_images)

    inspect = sub.add_parser("inspect", help="show a stored image's manifest, config, layers, SquashFS",
                             description="Print everything known about a stored image as JSON.")
    inspect.add_argument("reference", metavar="REF")
    inspect.set_defaults(handler=run_inspect)

    rmi = sub.add_parser("rmi", help="remove image references (and the image when none remains)",
                         description="Remove a tag; with a digest, every reference to that image. "
                         "The image's SquashFS goes when no reference remains; blobs stay until "
                         "`berth prune`.")
    rmi.add_argument("references", metavar="REF", nargs="+")
    _site_option(rmi, "remove from the site store (administrators)")
    rmi.add_argument("-f", "--force", action="store_true",
                     help="with --site: remove an image a template pins too (its jobs then fail)")
    rmi.set_defaults(handler=run_rmi)

    prune = sub.add_parser("prune", help="remove unreferenced images, unused blobs and stale temporary files",
                           description="Remove images no reference names, blobs no stored image "
                           "uses and temporary files of crashed pulls (older than an hour).")
    _site_option(prune, "prune the site store (administrators)")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(handler=run_prune)

    push = sub.add_parser("push", help="push a stored image to a registry",
                          description="Upload a stored image's blobs and manifest to DEST "
                          "(default: the name it was pulled under).")
    push.add_argument("reference", metavar="REF")
    push.add_argument("destination", metavar="DEST", nargs="?")
    push.add_argument("--insecure", action="store_true", help="talk plain HTTP to the registry")
    push.add_argument("--json", action="store_true", help="print JSON")
    push.set_defaults(handler=run_push)

    imp = sub.add_parser("import", help="import a docker-archive, OCI layout or rootfs tarball",
                         description="Import SOURCE as NAME[:TAG]: a `docker save` archive, an OCI "
                         "layout directory or a tar of one, or a plain root filesystem tarball "
                         "(plain, gzip, xz or bzip2), which becomes a one-layer image.")
    imp.add_argument("source", metavar="SOURCE")
    imp.add_argument("name", metavar="NAME[:TAG]")
    _site_option(imp, "import into the site store (administrators)")
    imp.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="platform to pick from an OCI layout holding an index")
    _quiet_json(imp)
    imp.set_defaults(handler=run_import)

    store = sub.add_parser("store", help="check the image store (verify)",
                           description="Maintenance of an image store.")
    store_sub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    store_sub.required = True
    verify = store_sub.add_parser(
        "verify", help="re-hash every blob and SquashFS and check the index against the disk",
        description="Recompute the digest of every blob and image SquashFS of your store (--site: "
        "the site store), check that every reference names a complete image and that no "
        "temporary file was left behind. Exits non-zero while problems remain. --repair removes "
        "what is damaged, converts images again from their stored blobs, and downloads what "
        "is missing.")
    _site_option(verify, "verify the site store (repairing it: administrators)")
    verify.add_argument("--repair", action="store_true",
                        help="remove damaged content and restore it (may pull from the registry)")
    verify.add_argument("--insecure", action="store_true",
                        help="talk plain HTTP to the registry when repairing (default: as configured)")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=run_store_verify)

    export = sub.add_parser("export", help="export a stored image as a docker-archive (docker load format)",
                            description="Write REF to FILE as a docker-archive (manifest.json, "
                            "config and layer tars), loadable with `docker load` or `berth import`.")
    export.add_argument("reference", metavar="REF")
    export.add_argument("file", metavar="FILE")
    export.set_defaults(handler=run_export)


def _site_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--site", action="store_true", help=text)


def _quiet_json(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print only the image digest")
    group.add_argument("--json", action="store_true", help="print a JSON result, no progress")


def _progress(args):
    if args.quiet or args.json:
        return None
    from berth.cli.progress import TerminalProgress

    return TerminalProgress(sys.stderr)


def run_pull(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.config.units import human_size
    from berth.image.pull import pull_image

    progress = _progress(args)
    try:
        result = pull_image(ctx.settings, args.reference, site=args.site, platform=args.platform,
                            insecure=args.insecure, progress=progress)
    finally:
        if progress is not None:
            progress.finish()  # the last counts stay on screen, above an error too
    for warning in result.warnings:
        print(f"berth: warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(result.to_json())
    elif args.quiet:
        print(result.image.digest)
    else:
        state = "pulled" if result.converted else "already stored, tag updated"
        print(f"{result.reference}: {state}")
        print(f"digest: {result.image.digest}")
        print(f"store: {result.image.store} ({result.image.squashfs}, {human_size(result.image.size_bytes)})")
        print(f"fetched {result.downloaded_blobs} blobs ({human_size(result.downloaded_bytes)}), "
              f"{result.cached_blobs} already stored, in {result.elapsed_s:.1f} s")
    return 0


def run_images(args, ctx) -> int:
    from berth.cli.output import print_json, print_table
    from berth.config.units import human_size
    from berth.image.manage import list_images

    listing = list_images(ctx.settings)
    rows = listing.rows
    for note in listing.notes:
        print(f"berth: note: {note}", file=sys.stderr)
    if args.json:
        print_json([row.to_json() for row in rows])
        return 0
    print_table(
        ("REPOSITORY", "TAG", "DIGEST", "SIZE", "STORE"),
        [(row.repository, row.tag or "<none>",
          str(row.digest) if args.no_trunc else row.digest.short,
          human_size(row.size_bytes), row.store) for row in rows],
    )
    return 0


def run_inspect(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.image.manage import inspect_image

    print_json(inspect_image(ctx.settings, args.reference))
    return 0


def run_rmi(args, ctx) -> int:
    from berth.config.units import human_size
    from berth.errors import BerthError
    from berth.image.manage import remove_image

    failed: BerthError | None = None
    for reference in args.references:
        try:
            result = remove_image(ctx.settings, reference, site=args.site, force=args.force)
        except BerthError as error:
            # Like docker: go on with the others, fail at the end.
            from berth.cli.main import print_error

            print_error(error)
            failed = error
            continue
        for key in result.untagged:
            print(f"untagged: {key}")
        if result.removed_digest is not None:
            print(f"deleted: {result.removed_digest} ({human_size(result.bytes_freed)})")
    if failed is not None:
        args.error_exit_code = failed.exit_code
        return failed.exit_code
    return 0


def run_prune(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.config.units import human_size
    from berth.image.manage import prune_store

    report = prune_store(ctx.settings, site=args.site)
    local = [] if args.site else _prune_node_local(ctx.settings)
    plans = 0
    if not args.site:
        from berth.runtime.plancache import forget_all

        plans = forget_all(os.environ)
    if args.json:
        print_json({"images_removed": report.images_removed, "blobs_removed": report.blobs_removed,
                    "tmp_removed": report.tmp_removed, "bytes_freed": report.bytes_freed,
                    "node_local_removed": [path for path, _ in local],
                    "node_local_bytes_freed": sum(size for _, size in local), "plans_removed": plans})
        return 0
    if plans:
        print(f"removed {plans} cached run plans on this node")
    for digest in report.images_removed:
        print(f"deleted image: {digest}")
    for path, _ in local:
        print(f"deleted node-local copy: {path}")
    print(f"removed {len(report.images_removed)} images, {report.blobs_removed} blobs, "
          f"{report.tmp_removed} temporary files: {human_size(report.bytes_freed)} freed")
    if local:
        print(f"removed {len(local)} unused node-local image copies on this node: "
              f"{human_size(sum(size for _, size in local))} freed")
    return 0


def _prune_node_local(settings) -> list[tuple[str, int]]:
    """The caller's node-local copies of images on this node that no container uses
    (``stage_to_local`` files, ``image_mount = "unpacked"`` trees)."""
    from berth.runtime.localcopy import prune_local
    from berth.runtime.state import resolve_state_dir

    return prune_local(resolve_state_dir(settings))


def run_push(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.image.push import push_image

    result = push_image(ctx.settings, args.reference, args.destination, insecure=args.insecure)
    if args.json:
        print_json(result)
    else:
        print(f"pushed {result['destination']} ({result['digest']}): {result['uploaded_blobs']} blobs "
              f"uploaded, {result['present_blobs']} already there")
    return 0


def run_import(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.config.units import human_size
    from berth.image.importer import import_image

    progress = _progress(args)
    try:
        image, kind = import_image(ctx.settings, args.source, args.name, site=args.site,
                                   platform=args.platform, progress=progress)
    finally:
        if progress is not None:
            progress.finish()
    if args.json:
        print_json({"reference": image.reference, "digest": str(image.digest), "store": image.store,
                    "squashfs": str(image.squashfs), "size_bytes": image.size_bytes, "source_kind": kind})
    elif args.quiet:
        print(image.digest)
    else:
        print(f"imported {args.source} ({kind}) as {image.reference}")
        print(f"digest: {image.digest}")
        print(f"store: {image.store} ({image.squashfs}, {human_size(image.size_bytes)})")
    return 0


def run_export(args, ctx) -> int:
    from berth.config.units import human_size
    from berth.image.export import export_image

    size = export_image(ctx.settings, args.reference, args.file)
    print(f"exported {args.reference} to {args.file} ({human_size(size)})")
    return 0


def run_store_verify(args, ctx) -> int:
    from berth.cli.output import print_json
    from berth.config.units import human_size
    from berth.errors import StoreError
    from berth.image.manage import verify_store

    report = verify_store(ctx.settings, site=args.site, repair=args.repair, insecure=args.insecure)
    if args.json:
        print_json(report.as_dict())
    else:
        for note in report.notes:
            print(f"berth: note: {note}", file=sys.stderr)
        for problem in report.problems:
            state = f" -> {problem.repaired}" if problem.repaired else ""
            print(f"{problem.kind}: {problem.path}: {problem.detail}{state}")
        print(f"{report.store} store {report.root}: {report.blobs_checked} blobs and "
              f"{report.images_checked} images checked ({human_size(report.bytes_hashed)} hashed), "
              f"{len(report.problems)} problems, {len(report.remaining)} remaining")
        if report.garbage:
            print(f"{len(report.garbage)} leftovers of interrupted writers in tmp/ (harmless; "
                  "`--repair` or `berth prune` removes them)")
    if report.remaining:
        site = " --site" if args.site else ""
        raise StoreError(
            f"{len(report.remaining)} problems remain in the {report.store} store {report.root}",
            hint=(f"run `berth store verify{site} --repair`" if not args.repair else
                  "see the problems above: what could not be restored must be pulled or imported again")
            + (" (the site store: ask your site administrator)" if args.site else ""))
    return 0
