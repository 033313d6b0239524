"""CLI commands: ``berth login`` and ``berth logout`` (docker's verbs and options).

``berth login [--username U] [--password-stdin | -p PASSWORD] [--insecure] REGISTRY`` checks the
credentials against the registry's ``/v2/`` first, then stores them in berth's own auth file
(``$XDG_CONFIG_HOME/berth/auth.json``, mode 0600, replaced atomically). ``berth logout REGISTRY``
removes them from that file. Files of other tools (``$REGISTRY_AUTH_FILE``,
``~/.docker/config.json``) are read when pulling but never written.
"""

from __future__ import annotations

import argparse
import getpass
import sys


def register(sub) -> None:
    """Add this module's commands to the top-level subparsers."""
    login = sub.add_parser(
        "login",
        help="log in to a registry (checks and stores credentials)",
        description="Check a user name and password against REGISTRY and store them in berth's "
        "auth file ($XDG_CONFIG_HOME/berth/auth.json, mode 0600) for later pulls and pushes.",
    )
    login.add_argument("registry", metavar="REGISTRY", help="registry host, e.g. 127.0.0.1:5000 or docker.io")
    login.add_argument("-u", "--username", help="user name (asked for when on a terminal)")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input (for scripts)")
    login.add_argument("-p", "--password",
                       help="password on the command line (insecure: other users can see it; "
                       "prefer --password-stdin)")
    login.add_argument("--insecure", action="store_true", default=None,
                       help="the registry speaks plain HTTP (default: as configured for it, else HTTPS)")
    login.set_defaults(handler=run_login)

    logout = sub.add_parser(
        "logout",
        help="remove a registry's stored credentials",
        description="Remove REGISTRY's credentials from berth's auth file.",
    )
    logout.add_argument("registry", metavar="REGISTRY", help="registry host, e.g. 127.0.0.1:5000")
    logout.set_defaults(handler=run_logout)


def _api_host(host_key: str) -> str:
    from berth.oci.reference import DOCKER_HUB, DOCKER_HUB_API

    return DOCKER_HUB_API if host_key == DOCKER_HUB else host_key


def _read_password(args: argparse.Namespace) -> str:
    from berth.errors import UsageError

    if args.password_stdin and args.password is not None:
        raise UsageError("--password and --password-stdin cannot be used together",
                         hint="use --password-stdin and pipe the password in")
    if args.password_stdin:
        password = sys.stdin.read()
        # Strip only the line ending a pipe adds: spaces may belong to the password.
        password = password.removesuffix("\n").removesuffix("\r")
    elif args.password is not None:
        print("berth: warning: a password given with --password is visible to other users of this "
              "machine (ps, shell history); use --password-stdin", file=sys.stderr)
        password = args.password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("no password given and standard input is not a terminal",
                         hint="pipe it in: berth login --username USER --password-stdin REGISTRY")
    if not password:
        raise UsageError("the password is empty", hint="give the registry password")
    return password


def _read_username(args: argparse.Namespace) -> str:
    from berth.errors import UsageError

    if args.username:
        return args.username
    if args.password_stdin:
        raise UsageError("--password-stdin needs --username",
                         hint="berth login --username USER --password-stdin REGISTRY")
    if sys.stdin.isatty():
        name = input("Username: ").strip()
        if name:
            return name
    raise UsageError("no user name given", hint="pass --username USER")


def run_login(args: argparse.Namespace, ctx) -> int:
    from berth.errors import ConfigError
    from berth.registry import auth
    from berth.registry.client import RegistryClient
    from berth.registry.transport import RetryPolicy

    key = auth.normalize_host(args.registry)
    host = _api_host(key)
    username = _read_username(args)
    password = _read_password(args)
    insecure = args.insecure if args.insecure is not None else ctx.settings.registry(key).insecure
    credentials = auth.Credentials.from_pairs({key: (username, password)}, source="the command line")
    # Few attempts: a person is waiting, and a wrong password is not worth repeating.
    with RegistryClient(host, insecure=insecure, credentials=credentials,
                        retry=RetryPolicy(attempts=3)) as client:
        client.ping()
    path = auth.berth_auth_file()
    _, passed_over = auth.save_login(key, username, password, path)
    if passed_over is not None:
        print(f"berth: warning: registry credentials file {path} was {passed_over.problem}: berth wrote it anew "
              "as your own (mode 0600) with this login only; what it held before was not kept", file=sys.stderr)
    # A file read before berth's own would hide what we just stored: say so.
    try:
        loaded = auth.load_credentials()
        source = loaded.source_for(key)
        for warning in loaded.warnings:
            print(f"berth: warning: {warning}", file=sys.stderr)
    except ConfigError:
        source = None  # a broken other file is reported when it is used, not here
    if source and source != str(path):
        print(f"berth: warning: credentials for {key} in {source} take precedence over {path}",
              file=sys.stderr)
    print(f"Login Succeeded (credentials for {key} saved in {path})")
    return 0


def run_logout(args: argparse.Namespace, ctx) -> int:
    from berth.errors import NotFound
    from berth.registry import auth

    key = auth.normalize_host(args.registry)
    path = auth.berth_auth_file()
    if auth.remove_login(key, path):
        print(f"Removed login credentials for {key} from {path}")
        remaining = auth.load_credentials().source_for(key)
        if remaining:
            print(f"berth: warning: credentials for {key} remain in {remaining}, which berth does not edit",
                  file=sys.stderr)
        return 0
    elsewhere = auth.load_credentials().source_for(key)
    if elsewhere:
        raise NotFound(
            f"berth's auth file {path} holds no credentials for {key}; they come from {elsewhere}",
            hint=f"berth logout edits only its own file: remove the entry from {elsewhere} "
            "(docker logout or podman logout do)",
        )
    print(f"Not logged in to {key}")
    return 0
