"""The CLI's command → module map stays in step with what the modules register."""

import argparse
import importlib

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


def test_unknown_command_still_lists_all_commands(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main.main(["nosuch"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nosuch'" in err and "'run'" in err and "'submit'" in err


def test_ctrl_c_while_the_command_modules_import_is_a_message_not_a_traceback(monkeypatch, capsys):
    """Scenario 3b (SIGINT at random early moments of berth run): a KeyboardInterrupt raised
    while build_parser imported the command's modules escaped main() as a traceback."""
    def interrupted(modules):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["run", "busybox", "true"]) == 130
    assert capsys.readouterr().err == "berth: interrupted\n"
