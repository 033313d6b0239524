"""Exit codes: one per error class, and an OSError that escapes library code is a message."""

import errno
import importlib
import pkgutil

import pytest

import berth
from berth import errors
from berth.cli import main as cli_main


def all_error_classes() -> list[type[errors.BerthError]]:
    """BerthError and every subclass defined anywhere in berth (all modules imported first, so a
    class added outside errors.py is enumerated too)."""
    for module in pkgutil.walk_packages(berth.__path__, "berth."):
        if module.name != "berth.__main__":
            importlib.import_module(module.name)
    found, todo = [], [errors.BerthError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_has_its_own_exit_code():
    classes = all_error_classes()
    assert len(classes) >= 20  # the walk found the hierarchy, not just the base
    codes: dict[int, str] = {}
    for cls in classes:
        assert "exit_code" in vars(cls), f"{cls.__name__} inherits its exit code: give it its own"
        assert 1 <= cls.exit_code <= 127 and cls.exit_code != 126, cls
        assert cls.exit_code not in codes, f"{cls.__name__} and {codes.get(cls.exit_code)} share {cls.exit_code}"
        codes[cls.exit_code] = cls.__name__


def _main_with_handler(monkeypatch, raised: BaseException) -> int:
    def handler(args, ctx):
        raise raised

    monkeypatch.setattr(cli_main, "build_parser", lambda modules, only=None: _parser(handler))
    return cli_main.main(["x"])


def _parser(handler):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("word")
    parser.set_defaults(handler=handler)
    return parser


@pytest.mark.parametrize("code, text, hint", [
    (errno.ENOSPC, "no space left on device", "free space"),
    (errno.EROFS, "read-only file system", "read-only"),
    (errno.EACCES, "permission denied", "permission"),
    (errno.EIO, "input/output error", "--debug"),
])
def test_an_escaping_os_error_is_a_message_not_a_traceback(monkeypatch, capsys, code, text, hint):
    import os

    raised = OSError(code, os.strerror(code), "/store/blobs/x.tmp")
    assert _main_with_handler(monkeypatch, raised) == errors.HostError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"berth: error: {text}: /store/blobs/x.tmp\n" in err
    assert "berth: hint: " in err and hint in err.split("berth: hint: ")[1]


def test_an_os_error_without_a_file_still_reads_as_a_message(monkeypatch, capsys):
    assert _main_with_handler(monkeypatch, OSError("odd failure")) == 74
    assert capsys.readouterr().err.startswith("berth: error: odd failure\n")


def test_a_programming_error_is_not_swallowed(monkeypatch):
    with pytest.raises(KeyError):
        _main_with_handler(monkeypatch, KeyError("bug"))
