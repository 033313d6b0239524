"""``NamedTuple`` class syntax without importing ``typing``.

``typing`` costs ~2.5 ms to import, on every `berth run` (issue 10, target 3: start-up), and the
run path uses it only for ``class X(NamedTuple)``. This is that syntax over
``collections.namedtuple``, as ``typing.NamedTupleMeta`` builds it (Python 3.11): fields from the
class body's annotations, in order, with its defaults; the body's methods, properties and
docstring copied onto the class; the result is the namedtuple class itself, so ``_replace``,
``_fields``, equality, hashing and repr are the standard ones. Generic named tuples are not
supported (berth has none). Type checkers see ``typing.NamedTuple``.

tests/unit/test_runtime_startup.py checks that `berth run` does not import ``typing``.
"""

from __future__ import annotations

import collections

_PROHIBITED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields", "_field_defaults",
                         "_make", "_replace", "_asdict", "_source"})
_SPECIAL = frozenset({"__module__", "__name__", "__annotations__", "__qualname__"})


class _NamedTupleMeta(type):
    def __new__(cls, typename: str, bases: tuple, namespace: dict):
        if bases == ():  # the NamedTuple base itself, below
            return super().__new__(cls, typename, bases, namespace)
        annotations = namespace.get("__annotations__", {})
        defaults = {}
        for name in annotations:
            if name in namespace:
                defaults[name] = namespace[name]
            elif defaults:
                raise TypeError(f"Non-default namedtuple field {name} cannot follow default field"
                                f"{'s' if len(defaults) > 1 else ''} {', '.join(defaults)}")
        result = collections.namedtuple(typename, list(annotations), defaults=list(defaults.values()),
                                        module=namespace["__module__"])
        result.__annotations__ = dict(annotations)
        if "__qualname__" in namespace:
            result.__qualname__ = namespace["__qualname__"]
        for key, value in namespace.items():
            if key in _PROHIBITED:
                raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
            if key not in _SPECIAL and key not in result._fields:
                setattr(result, key, value)
        return result


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    NamedTuple = _NamedTupleMeta("NamedTuple", (), {"__module__": __name__})
