"""berth.namedtuple.NamedTuple behaves as typing.NamedTuple for the classes berth writes."""

from __future__ import annotations

import pickle
import typing

import pytest

from berth.namedtuple import NamedTuple


def make(base):
    class Mount(base):
        """A bind mount."""

        source: str
        destination: str
        read_only: bool = True
        options: tuple = ()

        @property
        def flags(self) -> list[str]:
            return ["ro"] if self.read_only else ["rw"]

        def moved(self, destination: str) -> Mount:
            return self._replace(destination=destination)

        @classmethod
        def of(cls, path: str) -> Mount:
            return cls(path, path)

    return Mount


OURS, THEIRS = make(NamedTuple), make(typing.NamedTuple)


def test_same_fields_defaults_methods_and_docstring():
    ours, theirs = OURS("/a", "/b"), THEIRS("/a", "/b")
    assert OURS._fields == THEIRS._fields == ("source", "destination", "read_only", "options")
    assert OURS._field_defaults == THEIRS._field_defaults
    assert list(OURS.__annotations__) == list(THEIRS.__annotations__)  # typing wraps them in ForwardRef
    assert tuple(ours) == tuple(theirs) == ("/a", "/b", True, ())
    assert repr(ours) == repr(theirs) == "Mount(source='/a', destination='/b', read_only=True, options=())"
    assert ours.flags == theirs.flags == ["ro"]
    assert type(ours.moved("/c")) is OURS and ours.moved("/c").destination == "/c"
    assert OURS.of("/x") == THEIRS.of("/x") == ("/x", "/x", True, ())
    assert OURS.__doc__ == THEIRS.__doc__ == "A bind mount."
    assert (OURS.__qualname__, OURS.__module__) == (THEIRS.__qualname__, THEIRS.__module__)
    assert hash(ours) == hash(theirs) and ours == theirs
    assert ours._asdict() == theirs._asdict()
    with pytest.raises(AttributeError):
        ours.source = "/z"


def test_pickles_as_a_module_level_class():
    from berth.runtime.spec import BindMount

    mount = BindMount("/a", "/b")
    assert pickle.loads(pickle.dumps(mount)) == mount


def test_refuses_what_typing_refuses():
    with pytest.raises(TypeError, match="^Non-default namedtuple field b cannot follow default field a$"):
        class Bad(NamedTuple):
            a: int = 1
            b: int

    # The default fields are named, as typing names them (not every field of the class).
    with pytest.raises(TypeError, match="^Non-default namedtuple field c cannot follow default fields a, b$"):
        class Also(NamedTuple):
            a: int = 1
            b: int = 2
            c: int

    with pytest.raises(AttributeError, match="Cannot overwrite NamedTuple attribute _replace"):
        class Worse(NamedTuple):
            a: int

            def _replace(self):
                return self
