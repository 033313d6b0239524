"""`berth run` start-up is a product feature: its import path stays free of heavy modules."""

import subprocess
import sys

HEAVY = ("urllib3", "tarfile", "ssl", "http.client", "ctypes", "email.message", "concurrent.futures",
         "zipfile", "xml.etree.ElementTree")


def test_run_path_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from berth.cli.main import build_parser\n"
        "args = build_parser().parse_args(['run', '--cpus', '1', '-v', '/a:/b', 'x:1', 'true'])\n"
        "import berth.cli.run, berth.runtime.container, berth.image.api, berth.config.load\n"
        "from berth.runtime.options import options_from_namespace\n"
        "options_from_namespace(args)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


#: Not heavy, but not needed by `berth run` of a stored image on a node without configuration
#: files: tomllib (~3.5 ms) only parses files that exist, hashlib (~3 ms, OpenSSL) only hashes
#: blobs, secrets/random only make names, typing (~2.5 ms) only annotates (berth.namedtuple
#: stands in for its NamedTuple), dataclasses with inspect, ast, dis, tokenize (~7 ms, and
#: ~0.6 ms of generated code per class) only makes frozen classes (berth.record stands in),
#: shlex only splits templates' custom options, urllib.parse (with ipaddress, ~2.2 ms) only
#: serves registries and PurePath.as_uri (berth/__init__.py keeps pathlib from importing it).
#: A run must not pay for them.
NOT_ON_RUN_PATH = (*HEAVY, "tomllib", "hashlib", "secrets", "random", "tempfile", "difflib", "typing",
                   "dataclasses", "inspect", "ast", "dis", "tokenize", "shlex", "urllib.parse", "ipaddress")

#: What `berth run` imports after parsing: the image look-up, the container and what it imports
#: while it runs (the image mount, the launcher), and the node-local copies of sites that use them.
RUN_PATH_MODULES = ("berth.cli.run", "berth.image.api", "berth.config.load", "berth.runtime.container",
                    "berth.runtime.imagemount", "berth.runtime.localcopy", "berth.runtime.launcher",
                    "berth.runtime.ocirt")


def test_run_of_a_stored_image_imports_only_what_it_uses(tmp_path):
    code = (
        "import sys\n"
        "from berth.cli.main import Context, build_parser, modules_for\n"
        "argv = ['run', '--cpus', '1', '-e', 'A=1', '-v', '/a:/b', '127.0.0.1:5000/x/y:1', 'true']\n"
        "args = build_parser(modules_for(argv)).parse_args(argv)\n"
        "from berth.runtime.options import options_from_namespace\n"
        "options_from_namespace(args)\n"
        "settings = Context(args).settings\n"
        "from berth.cli.run import resolve_image\n"
        "from berth.errors import NotFound\n"
        "try:\n"
        "    resolve_image(settings, args.image, 'never')\n"
        "except NotFound:\n"
        "    pass\n"
        f"for name in {RUN_PATH_MODULES!r}:\n"
        "    __import__(name)\n"
        f"print(sorted(m for m in {NOT_ON_RUN_PATH!r} if m in sys.modules))\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BERTH_CONFIG_DIR": str(empty),
           "XDG_CONFIG_HOME": str(empty), "BERTH_USER_STORE": str(tmp_path / "store"),
           "BERTH_SITE_STORE": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_version_builds_no_command_parser():
    code = (
        "import sys\n"
        "from berth.cli.main import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('berth.') and m not in\n"
        "             ('berth.cli', 'berth.cli.main', 'berth.errors')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [f"berth {__import__('berth').__version__}", "[]"], result.stdout


def test_run_with_unchanged_configuration_files_parses_none(tmp_path):
    """Issue 10 (start-up): with a site file and a user file, the first command parses them
    (tomllib) and keeps the parse in the caller's state directory; later ones with the same
    files import neither tomllib nor typing, and load the same settings."""
    code = (
        "import sys\n"
        "from berth.config.load import effective_values, load_settings\n"
        "values = effective_values(load_settings())\n"
        f"for name in {RUN_PATH_MODULES!r}:\n"
        "    __import__(name)\n"
        "print(sorted(m for m in ('tomllib', 'typing', 'datetime', 'dataclasses') if m in sys.modules))\n"
        "print(repr(values))\n"
    )
    site, runtime, home = tmp_path / "site", tmp_path / "run-user", tmp_path / "home"
    (home / ".config" / "berth").mkdir(parents=True)
    site.mkdir()
    runtime.mkdir(mode=0o700)
    (site / "berth.toml").write_text('pull_retries = 4\n[[policy.mounts]]\nsource = "/srv"\ndestination = "/srv"\n')
    (home / ".config" / "berth" / "berth.toml").write_text("pull_parallel = 2\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "BERTH_CONFIG_DIR": str(site),
           "XDG_RUNTIME_DIR": str(runtime)}
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout.splitlines() for _ in range(2))
    assert first[0] == "['datetime', 'tomllib', 'typing']"  # the control: parsing imports them
    assert second[0] == "[]"
    assert second[1] == first[1] and "pull_retries" in first[1]


#: The execution half of a run (issue 10, target 3): what makes a plan true and runs it --
#: the container's state directory, the image mount, the bundle, the runtime's choice and
#: start, the teardown -- and the one gateway they run programs through. A run whose plan is
#: cached (berth.runtime.plancache) executes with these alone.
EXECUTION_MODULES = ("berth.runtime.state", "berth.runtime.imagemount", "berth.runtime.fuse",
                     "berth.runtime.materialise", "berth.runtime.ocirt", "berth.runtime.supervise",
                     "berth.runtime.launcher", "berth.runtime.limits", "berth.proc")

#: What the execution half used to import and must not again: subprocess (with threading and
#: selectors, ~1.5 ms: berth.proc spawns with posix_spawn), shutil (with bz2, lzma, zlib, ~1.5
#: ms: fsutil.remove_tree and proc.find_program need none of it), argparse (with gettext, via
#: berth.runtime.options' is_container_name), the planning modules (plan, spec, policy,
#: options, settings: a cached plan is made already), and what only rare paths need (the
#: runtime probe's tempfile, node-local copies, host checks of error messages, the overlay's
#: mount points).
NOT_ON_EXECUTION_PATH = (*NOT_ON_RUN_PATH, "subprocess", "threading", "selectors", "shutil", "bz2", "lzma",
                         "argparse", "gettext", "berth.runtime.plan", "berth.runtime.spec", "berth.runtime.policy",
                         "berth.runtime.options", "berth.config.settings", "berth.config.load",
                         "berth.runtime.localcopy", "berth.runtime.hostcheck", "berth.runtime.rootfs",
                         "urllib.parse", "ipaddress")


def test_the_execution_half_of_a_run_imports_only_what_it_uses(tmp_path):
    """Not only the imports: a container's life as the execution half lives it -- state
    directory, stale clean-up, a container directory, its record, the runtime's choice for a
    config, a program started and waited for with signals forwarded, one run to completion,
    the teardown -- in a fresh interpreter, then what it imported."""
    code = (
        "import sys\n"
        f"for name in {EXECUTION_MODULES!r}:\n"
        "    __import__(name)\n"
        "from pathlib import Path\n"
        "from berth import proc\n"
        "from berth.runtime import materialise, ocirt, state, supervise\n"
        f"state_dir = state.ensure_state_dir(Path({str(tmp_path / 'state')!r}))\n"
        "state.cleanup_stale(state_dir)\n"
        "container = state.create(state_dir, None)\n"
        "materialise.make_directories(container)\n"
        "container.write_info({'id': container.id, 'pid': 1})\n"
        "assert ocirt.candidates('auto', {'ociVersion': '1.0.2'}) == ocirt.RUNTIMES\n"
        "assert proc.wait_forwarding(proc.start(['/bin/sh', '-c', 'exit 3'], new_session=True)) == 3\n"
        "assert proc.run(['/bin/echo', 'ok']).stdout == b'ok\\n'\n"
        "supervise.teardown(container, '', [])\n"
        "assert not container.path.exists()\n"
        f"print(sorted(m for m in {NOT_ON_EXECUTION_PATH!r} if m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_pathlib_hook_acts_once_and_never_on_a_reload():
    """The hook patched exec_module on the loader of pathlib's spec for good: executing pathlib
    again through it (a reload that reuses the module's spec or loader) put the stand-in in
    sys.modules over the real urllib.parse and then dropped it there (the next import made a
    second urllib.parse), and bound the stand-in's quote_from_bytes into pathlib again. A reload
    of berth before pathlib is imported put a second hook in sys.meta_path."""
    code = (
        "import importlib, sys\n"
        "import berth\n"
        "importlib.reload(berth)\n"
        "print(sum(getattr(f, '__qualname__', '') == '_PathlibWithoutUrllibParse' for f in sys.meta_path))\n"
        "import pathlib\n"
        "spec = pathlib.__spec__\n"
        "print('urllib.parse' in sys.modules, 'exec_module' in vars(spec.loader))\n"
        "import urllib.parse\n"
        "real = urllib.parse\n"
        "spec.loader.exec_module(pathlib)\n"
        "print(sys.modules.get('urllib.parse') is real, pathlib.urlquote_from_bytes is real.quote_from_bytes)\n"
        "importlib.reload(pathlib)\n"
        "print(sys.modules.get('urllib.parse') is real, pathlib.urlquote_from_bytes is real.quote_from_bytes)\n"
        "print(pathlib.PurePosixPath('/a b').as_uri())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["1", "False False", "True True", "True True", "file:///a%20b"], \
        result.stdout + result.stderr


def test_pathlib_comes_without_urllib_parse_and_both_still_work():
    """Once berth is imported, pathlib comes without the urllib.parse (and ipaddress) it imports
    for PurePath.as_uri alone (~2.2 ms of every start), and only when something imports it;
    as_uri and urllib.parse still work."""
    code = (
        "import sys\n"
        "import berth\n"
        "print('pathlib' in sys.modules)\n"
        "from pathlib import PurePosixPath\n"
        "print(sorted(m for m in ('urllib.parse', 'ipaddress') if m in sys.modules))\n"
        "print(PurePosixPath('/a b/%c').as_uri())\n"
        "import urllib.parse\n"
        "print(urllib.parse.urlsplit('https://registry:5000/v2/').port, urllib.parse.quote('a b'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["False", "[]", "file:///a%20b/%25c", "5000 a%20b"], result.stdout + result.stderr
