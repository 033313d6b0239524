"""The CLI's command → module map stays in step with what the modules register."""

import argparse
import importlib
import os
import subprocess
import sys
import textwrap

import pytest

from berth.cli import main as cli_main


def registered_commands(module_name: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module_name).register(sub)
    return set(sub.choices)


def test_every_registered_command_is_mapped_to_its_module():
    expected = {}
    for module in cli_main.COMMAND_MODULES:
        for command in registered_commands(module):
            expected[command] = module
    assert cli_main.COMMANDS == expected


@pytest.mark.parametrize(
    "argv, modules",
    [
        (["run", "img", "true"], ("berth.cli.run",)),
        (["--debug", "pull", "x"], ("berth.cli.images",)),
        (["template", "list"], ("berth.cli.config",)),
        (["--help"], cli_main.COMMAND_MODULES),
        (["nosuch"], cli_main.COMMAND_MODULES),
        ([], cli_main.COMMAND_MODULES),
    ],
)
def test_only_the_named_commands_module_is_loaded(argv, modules):
    assert cli_main.modules_for(argv) == modules


@pytest.mark.parametrize("argv", [
    ["run", "--cpus", "2", "-e", "A=1", "img", "true", "-x"],
    ["--debug", "exec", "-t", "c1", "ls"],
    ["config", "show", "--json"],
    ["template", "create", "t", "image=x", "cpu=2"],
    ["store", "verify"],
    ["stage", "in", "s3://b/k:/tmp/x"],
    ["job-exec", "--backend", "local", "/tmp/record"],
])
def test_one_commands_parser_parses_as_the_whole_parser(argv):
    """Issue 10 (start-up): only the command being run gets its parser built."""
    whole = cli_main.build_parser().parse_args(argv)
    one = cli_main.build_parser(cli_main.modules_for(argv), only=cli_main.command_for(argv)).parse_args(argv)
    assert vars(one) == vars(whole)


@pytest.mark.parametrize("argv", [["run"], ["run", "--cpus"], ["run", "--bogus", "img"], ["exec"],
                                  ["config", "nosuch"], ["run", "--help"], ["stage", "--help"]])
def test_one_commands_parser_refuses_and_helps_as_the_whole_parser(argv, capsys):
    outputs = []
    for parser in (cli_main.build_parser(),
                   cli_main.build_parser(cli_main.modules_for(argv), only=cli_main.command_for(argv))):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        outputs.append((info.value.code, capsys.readouterr()))
    assert outputs[0] == outputs[1]


def test_unknown_command_still_lists_all_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main.main(["nosuch"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err and "'run'" in err and "'submit'" in err


def test_ctrl_c_while_the_command_modules_import_is_a_message_not_a_traceback(monkeypatch, capsys):
    """Scenario 3b (SIGINT at random early moments of berth run): a KeyboardInterrupt raised
    while build_parser imported the command's modules escaped main() as a traceback."""
    def interrupted(modules, only=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["run", "busybox", "true"]) == 130
    assert capsys.readouterr().err == "berth: interrupted\n"



def _console(body: str, **kwargs):
    """Run berth's console entry point in a new interpreter, main() replaced by ``body``
    (Python statements ending in ``return CODE``)."""
    code = ("import sys\n"
            "import berth.cli.main as cli_main\n"
            "def fake_main():\n" + textwrap.indent(textwrap.dedent(body), "    ") +
            "cli_main.main = fake_main\n"
            "cli_main.console()\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-c", code], env=env, **kwargs)


def test_console_exits_with_mains_code_and_all_of_its_output():
    """Issue 10 (start-up): the berth script skips the interpreter's teardown (~10 ms of every
    `berth run`) when nothing needs it; every byte of output is still written."""
    result = _console("sys.stdout.write('x' * 200000)\nsys.stderr.write('note')\nreturn 3\n", capture_output=True)
    assert (result.returncode, len(result.stdout), result.stderr) == (3, 200000, b"note")


def test_console_exits_normally_when_an_atexit_callback_a_thread_or_a_profiler_is_left(tmp_path):
    result = _console("import atexit\natexit.register(print, 'atexit ran')\nreturn 4\n", capture_output=True)
    assert (result.returncode, result.stdout) == (4, b"atexit ran\n")
    done = tmp_path / "thread-done"
    result = _console("import threading, time\n"
                      "def late():\n"
                      "    time.sleep(0.2)\n"
                      f"    open({str(done)!r}, 'w').close()\n"
                      "threading.Thread(target=late).start()\nreturn 5\n")
    assert result.returncode == 5
    assert done.exists()  # the interpreter waited for the thread, as without the fast exit
    profile = tmp_path / "run.prof"
    code = ("import cProfile, sys\nimport berth.cli.main as cli_main\ncli_main.main = lambda: 6\n"
            f"cProfile.run('cli_main.console()', {str(profile)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)  # cProfile.run swallows SystemExit
    assert profile.stat().st_size > 0  # it wrote its report: console() did not end the process


def test_console_reports_a_failed_flush_as_python_does():
    """stdout on a full disk: the interpreter's own exit reports it (status 120), as before."""
    with open("/dev/full", "w") as full:
        result = _console("sys.stdout.write('x' * 100)\nreturn 0\n", stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 120



def test_console_pauses_the_garbage_collector_for_start_up_only():
    """Issue 10 (start-up): the collector is off while berth imports and builds its parser
    (~20 collections, ~2 ms of every `berth run`), and on, the start-up's objects frozen out
    of it, when the command runs (the job runner runs for hours and must collect)."""
    code = ("import argparse, gc\n"
            "import berth.cli.main as cli_main\n"
            "def handler(args, ctx):\n"
            "    print('command', gc.isenabled(), gc.get_freeze_count() > 0)\n"
            "    return 0\n"
            "def build_parser(modules, only=None):\n"
            "    print('start-up', gc.isenabled())\n"
            "    parser = argparse.ArgumentParser()\n"
            "    parser.add_argument('--debug', action='store_true')\n"
            "    parser.set_defaults(handler=handler)\n"
            "    return parser\n"
            "cli_main.build_parser = build_parser\n"
            "cli_main.console()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["start-up False", "command True True"], result.stdout + result.stderr


def test_main_leaves_the_garbage_collector_as_it_found_it(monkeypatch):
    """main() called by a program (these tests) neither freezes that program's objects nor
    turns its collector on or off: only the console script pauses it."""
    import gc

    def build_parser(modules, only=None):
        parser = argparse.ArgumentParser()
        parser.add_argument("--debug", action="store_true")
        parser.set_defaults(handler=lambda args, ctx: 7)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", build_parser)
    frozen = gc.get_freeze_count()
    assert (cli_main.main([]), gc.isenabled(), gc.get_freeze_count()) == (7, True, frozen)
