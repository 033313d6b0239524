"""CLI commands: `berth config show|check` and `berth template create|list|show|modify|delete|refresh`.

Templates follow NQSV's syntax (DESIGN.md decision 7):
``berth template create NAME image=REF cpu=N memsz=SIZE [gpu=N] [boot_timeout=S] [stop_timeout=S]
[custom="OPTIONS"] [comment="TEXT"]``. The image is pulled into the site store here (the CLI
layer may use berth.image; berth.config may not) and its manifest digest is pinned in the
template. ``custom`` is checked against site policy before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub) -> None:
    """Add `config` and `template` to the top-level subparsers."""
    config = sub.add_parser("config", help="show and check the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    show = config_sub.add_parser("show", help="print every effective setting and where it comes from")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_config_show)
    check = config_sub.add_parser("check", help="validate the configuration files and every template")
    check.set_defaults(handler=cmd_config_check)

    template = sub.add_parser("template", help="container templates (admins: create, modify, delete, refresh)",
                              description="Container templates, NQSV style: site configuration written by "
                              "the administrator, used by `berth submit --template NAME`.")
    template_sub = template.add_subparsers(dest="template_command", metavar="SUBCOMMAND")
    template_sub.required = True
    words_help = ("key=value words: image=REF cpu=N memsz=SIZE (4G, 512M) [gpu=N] [boot_timeout=SECONDS] "
                  "[stop_timeout=SECONDS] [custom=\"BERTH RUN OPTIONS\"] [comment=\"TEXT\"]")
    create = template_sub.add_parser("create", help="create a template; pulls its image into the site store and pins it")
    create.add_argument("name", metavar="NAME")
    create.add_argument("words", metavar="KEY=VALUE", nargs="*", help=words_help)
    create.set_defaults(handler=cmd_template_create)
    modify = template_sub.add_parser("modify", help="change keys of a template (a new image is pulled and pinned)")
    modify.add_argument("name", metavar="NAME")
    modify.add_argument("words", metavar="KEY=VALUE", nargs="*", help=words_help)
    modify.set_defaults(handler=cmd_template_modify)
    refresh = template_sub.add_parser("refresh", help="pull the template's image reference again and pin the new digest")
    refresh.add_argument("name", metavar="NAME")
    refresh.set_defaults(handler=cmd_template_refresh)
    delete = template_sub.add_parser("delete", help="delete a template (the image stays in the site store)")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(handler=cmd_template_delete)
    listing = template_sub.add_parser("list", help="list the site's templates")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_template_list)
    show_t = template_sub.add_parser("show", help="show one template")
    show_t.add_argument("name", metavar="NAME")
    show_t.add_argument("--json", action="store_true", help="machine-readable output")
    show_t.set_defaults(handler=cmd_template_show)


# --- config ---------------------------------------------------------------------------------------


def _value_text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def cmd_config_show(args: argparse.Namespace, ctx) -> int:
    from berth.cli.output import print_json, print_table
    from berth.config.load import effective_values

    rows = effective_values(ctx.settings)
    if args.json:
        print_json({key: {"value": value, "source": source} for key, value, source in rows})
    else:
        print_table(("KEY", "VALUE", "SOURCE"), [(key, _value_text(value), source) for key, value, source in rows])
    return 0


def cmd_config_check(args: argparse.Namespace, ctx) -> int:
    """Load everything the way berth does and report each problem (exit 78 if any)."""
    from berth.config.load import config_files
    from berth.config.templates import is_template_name, read_template_file
    from berth.errors import BerthError, ConfigError
    from berth.image.api import find_in_store, store_for

    settings = ctx.settings  # raises the first settings error, with file:line
    for path, layer in config_files(settings.config_dir):
        state = "read" if path.is_file() else "absent"
        print(f"{layer} file {path}: {state}")
    problems: list[str] = []
    templates = []
    directory = settings.templates_dir
    names = sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []
    for name in names:
        if not is_template_name(name):
            problems.append(f"{directory / (name + '.toml')}: '{name}' is not a valid template name; the file is ignored")
            continue
        try:
            templates.append(read_template_file(directory / f"{name}.toml", name))
        except BerthError as error:
            problems.append(error.message)
    # Look in the site store only: a copy in the caller's own store does not help other users.
    site_store = store_for(settings, site=True)
    for template in templates:
        if template.image_digest is None:
            problems.append(f"template '{template.name}': image {template.image} is not pinned "
                            f"(run `berth template refresh {template.name}`)")
        elif find_in_store(site_store, template.pinned_reference) is None:
            problems.append(f"template '{template.name}': pinned image {template.pinned_reference} is not in the "
                            f"site store {settings.site_store} (run `berth template refresh {template.name}`)")
    print(f"templates in {directory}: {len(templates)} valid")
    from berth.cli.output import printable

    for problem in problems:
        print(f"problem: {printable(problem)}")  # one line each, whatever a file is named
    if problems:
        raise ConfigError(f"{len(problems)} configuration problem{'s' if len(problems) > 1 else ''} found",
                          hint="each is listed above")
    print("configuration ok")
    return 0


# --- templates ------------------------------------------------------------------------------------


def _check_custom(settings, name: str, custom: str) -> None:
    """Validate ``custom`` as `berth run` options against site policy (runtime's parser/policy)."""
    if not custom:
        return
    from berth.errors import BerthError
    from berth.runtime.options import parse_custom
    from berth.runtime.policy import check_options

    try:
        check_options(settings, parse_custom(custom))
    except BerthError as error:
        error.message = f"template '{name}': custom=\"{custom}\": {error.message}"
        error.args = (error.message,)
        raise


def _pull_digest(settings, ref: str) -> str:
    """Pull ``ref`` into the site store (or find it there) and return its manifest digest."""
    from berth.errors import NotFound
    from berth.image.api import index_key, parse_reference, pull, store_for

    print(f"pulling {ref} into the site store {settings.site_store}", file=sys.stderr)
    image = pull(settings, ref, site=True)
    # The site index names the pinned image by digest too, so that pulling the tag again,
    # `rmi --site` of the tag or `prune --site` does not remove what the template's jobs run.
    pinned = index_key(parse_reference(ref).with_digest(image.digest))
    if not store_for(settings, site=True).name_image(pinned, image.digest):
        raise NotFound(f"the image {image.digest} of {ref} left the site store {settings.site_store} "
                       "while berth pinned it", hint="someone removed it meanwhile: run the command again")
    return str(image.digest)


def cmd_template_create(args: argparse.Namespace, ctx) -> int:
    from berth.config.templates import (
        Template, check_can_edit, check_name, create_template, parse_assignments, template_path,
    )
    from berth.errors import ConfigError

    name = check_name(args.name)
    values = parse_assignments(args.words, require=True)
    settings = ctx.settings
    check_can_edit(settings)
    if template_path(settings, name).exists():
        raise ConfigError(f"template '{name}' already exists",
                          hint=f"change it with `berth template modify {name} key=value...`, or delete it first")
    _check_custom(settings, name, values.get("custom", ""))
    digest = _pull_digest(settings, values["image"])
    template = create_template(settings, Template(name=name, image_digest=digest, **values))
    print(f"created template {name}: {template.image} pinned at {digest}")
    return 0


def cmd_template_modify(args: argparse.Namespace, ctx) -> int:
    from berth.config.templates import check_can_edit, check_name, load_template, parse_assignments, update_template

    name = check_name(args.name)
    changes = parse_assignments(args.words, require=False)
    settings = ctx.settings
    check_can_edit(settings)
    load_template(settings, name)  # NotFound before any pull
    if "custom" in changes:
        _check_custom(settings, name, changes["custom"])
    if "image" in changes:
        changes["image_digest"] = _pull_digest(settings, changes["image"])
    template = update_template(settings, name, changes)
    changed = ", ".join(sorted(changes))
    print(f"modified template {name}: {changed}" + (f" (pinned at {template.image_digest})" if "image" in changes else ""))
    return 0


def cmd_template_refresh(args: argparse.Namespace, ctx) -> int:
    from berth.config.templates import check_can_edit, check_name, load_template, update_template

    name = check_name(args.name)
    settings = ctx.settings
    check_can_edit(settings)
    current = load_template(settings, name)
    digest = _pull_digest(settings, current.image)
    update_template(settings, name, {"image_digest": digest}, expect_image=current.image)
    if digest == current.image_digest:
        print(f"template {name}: {current.image} unchanged at {digest}")
    else:
        print(f"template {name}: {current.image} now pinned at {digest} (was {current.image_digest or 'unpinned'})")
    return 0


def cmd_template_delete(args: argparse.Namespace, ctx) -> int:
    from berth.config.templates import check_name, delete_template

    name = check_name(args.name)
    delete_template(ctx.settings, name)
    print(f"deleted template {name}")
    return 0


def cmd_template_list(args: argparse.Namespace, ctx) -> int:
    from berth.cli.output import print_json, print_table
    from berth.config.templates import list_templates
    from berth.config.units import format_size

    templates = list_templates(ctx.settings)
    if args.json:
        print_json([template.to_json() for template in templates])
        return 0
    print_table(
        ("NAME", "IMAGE", "DIGEST", "CPU", "MEMSZ", "GPU", "BOOT", "STOP", "COMMENT"),
        [(t.name, t.image, (t.image_digest or "unpinned")[:19], t.cpu, format_size(t.memsz_bytes), t.gpu,
          f"{t.boot_timeout_s}s", f"{t.stop_timeout_s}s", t.comment) for t in templates],
    )
    return 0


def cmd_template_show(args: argparse.Namespace, ctx) -> int:
    from berth.cli.output import print_json
    from berth.config.templates import check_name, load_template
    from berth.config.units import format_size

    template = load_template(ctx.settings, check_name(args.name))
    if args.json:
        print_json(template.to_json())
        return 0
    rows = [
        ("name", template.name), ("image", template.image),
        ("image_digest", template.image_digest or "unpinned"), ("pinned_reference", template.pinned_reference),
        ("cpu", template.cpu), ("memsz", f"{format_size(template.memsz_bytes)} ({template.memsz_bytes} bytes)"),
        ("gpu", template.gpu), ("boot_timeout", f"{template.boot_timeout_s}s"),
        ("stop_timeout", f"{template.stop_timeout_s}s"), ("custom", template.custom), ("comment", template.comment),
        ("updated_by", template.updated_by), ("updated_at", template.updated_at),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
