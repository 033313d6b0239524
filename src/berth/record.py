"""Record classes, as ``@dataclass`` makes them, without importing ``dataclasses``: berth's one
mechanism for record classes.

The rule (one of each): a class whose instances are named fields, read by name, is a
:class:`Record` (frozen unless it must change: ``frozen=False``); a result that callers unpack
into variables, index or iterate is a ``berth.namedtuple.NamedTuple``. Nothing in src/berth
imports ``dataclasses`` (an import-linter contract in pyproject.toml checks it). bench/ and
tests/harness keep ``dataclasses`` on purpose: they are not on berth's start-up path (the
rule's reason, below), their fixtures would otherwise fail together with the mechanism under
test, and some need what a record does not do (``__post_init__`` in tests/harness/faultproxy.py).

``dataclasses`` imports ``inspect`` (with ``ast``, ``dis``, ``tokenize``: ~7 ms) and compiles six
generated methods for every class at import (~0.6 ms a class): the 18 frozen dataclasses of
the `berth run` path made ~20 of its ~49 ms of imports (issue 10, target 3: start-up; measured
with ``python -X importtime``: 49 ms before, 29 ms with records; bench/RESULTS.md section 2).
A class deriving from :class:`Record` gets the same behaviour from generic methods instead::

    class Mount(Record):
        source: str
        read_only: bool = True
        extra: dict = field(default_factory=dict, compare=False)

    class Digest(Record, order=True): ...

    class Report(Record, frozen=False):   # mutable: counts as it goes
        entries: int = 0

What it keeps from a dataclass: fields from the class body's annotations in order
(a base record's first), defaults and ``field(default=..., default_factory=..., compare=...,
repr=...)``; ``__init__`` taking the fields by position or name; for a frozen record (the
default) assignment and deletion raise :class:`FrozenInstanceError` (an ``AttributeError``) and
``hash`` hashes the compared fields, a mutable one (``frozen=False``) assigns and has no hash,
as ``@dataclass(eq=True)``; ``==`` compares the compared fields of two instances of the same
class (NotImplemented for any other), ``order=True`` adds ``<`` and friends on them; ``repr`` is
``Name(field=value, ...)`` without the ``repr=False`` fields; methods a class defines itself win.
A mutable record may declare ``__slots__`` (its field names) instead of ``@dataclass(slots=True)``.
:func:`fields`, :func:`replace` and :func:`asdict` stand for ``dataclasses.fields``,
``dataclasses.replace`` and ``dataclasses.asdict``; ``__match_args__`` for ``case`` patterns.
As a dataclass, a record refuses an unhashable default (a list, dict or set would be shared by
every instance: ``default_factory``), and a frozen one that defines its own ``__eq__`` still
hashes its compared fields. Not supported (berth's records use none): ``InitVar`` and
``ClassVar`` (refused, never silently made fields), ``__post_init__``, ``kw_only``,
``init=False``, frozen records with ``__slots__``. Instances are not tuples (unlike ``berth.namedtuple``): they do not iterate,
index or equal a tuple, so code that tells records from tuples (``berth config show``'s
rendering) keeps working.

tests/unit/test_record.py holds it to those semantics; tests/unit/test_runtime_startup.py checks
that `berth run` does not import ``dataclasses``.
"""

from __future__ import annotations

class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: The default of a field without one (as ``dataclasses.MISSING``).
MISSING = _Missing()


class FrozenInstanceError(AttributeError):
    """Assigning to or deleting a field of a record (as ``dataclasses.FrozenInstanceError``)."""


class Field:
    """One field of a record: ``name``, ``default`` or ``default_factory`` (else MISSING),
    whether ``==``, ``hash`` and order compare it, and whether ``repr`` shows it."""

    __slots__ = ("name", "default", "default_factory", "compare", "repr")

    def __init__(self, default=MISSING, default_factory=MISSING, compare: bool = True, name: str = "",
                 repr: bool = True) -> None:  # noqa: A002 (dataclasses' name)
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = name
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.repr = repr

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r}, default={self.default!r}, "
                f"default_factory={self.default_factory!r}, compare={self.compare!r}, repr={self.repr!r})")


def field(*, default=MISSING, default_factory=MISSING, compare: bool = True, repr: bool = True):  # noqa: A002
    """A field's default made by ``default_factory()`` per instance, a field left out of
    ``==``/``hash`` (``compare=False``) or out of ``repr`` (``repr=False``: secrets); as
    ``dataclasses.field``."""
    return Field(default, default_factory, compare, repr=repr)


class Record:
    """Base of frozen record classes (see the module docstring)."""

    __slots__ = ()
    #: The fields, in order (set for every subclass).
    __record_fields__: tuple[Field, ...] = ()
    #: The names of the fields that ``==``, ``hash`` and order compare.
    __record_compared__: tuple[str, ...] = ()
    #: False for a mutable record (``frozen=False``).
    __record_frozen__: bool = True
    #: True for a record that declares ``__slots__`` (its values live in slots, not in ``__dict__``).
    __record_slotted__: bool = False

    def __init_subclass__(cls, *, order: bool = False, frozen: bool = True, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if any(base is not Record and issubclass(base, Record) for base in cls.__bases__) \
                and frozen != cls.__record_frozen__:  # as dataclasses refuses a mixed hierarchy
            raise TypeError("cannot inherit non-frozen record from a frozen one" if not frozen
                            else "cannot inherit frozen record from a non-frozen one")
        slots = cls.__dict__.get("__slots__", None)
        if slots is not None and frozen:
            # A frozen record restores its values (copy, pickle) into __dict__; slots would need
            # their own __setstate__, and no record of berth needs both.
            raise TypeError(f"{cls.__qualname__}: __slots__ is supported for mutable records (frozen=False) only")
        slots = () if slots is None else (slots,) if isinstance(slots, str) else tuple(slots)
        found = {item.name: item for item in cls.__record_fields__}  # a base record's, first
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            if _pseudo_field(annotation):
                raise TypeError(f"{cls.__qualname__}.{name}: ClassVar and InitVar are not supported by records")
            value = MISSING if name in slots else cls.__dict__.get(name, MISSING)  # a slot's descriptor
            if isinstance(value, Field):
                value.name = name
                if value.default is MISSING:
                    delattr(cls, name)  # as dataclasses: no class attribute for a factory's field
                else:
                    setattr(cls, name, value.default)
                found[name] = value
            else:
                found[name] = Field(default=value, name=name)
            default = found[name].default
            if default is not MISSING and type(default).__hash__ is None:  # list, dict, set: shared by all
                raise ValueError(f"mutable default {type(default)} for field {name} is not allowed: use default_factory")
        defaults_seen = False
        for item in found.values():
            if item.default is MISSING and item.default_factory is MISSING:
                if defaults_seen:
                    raise TypeError(f"non-default argument {item.name!r} follows default argument")
            else:
                defaults_seen = True
        cls.__record_fields__ = tuple(found.values())
        cls.__record_compared__ = tuple(item.name for item in found.values() if item.compare)
        cls.__record_frozen__ = frozen
        cls.__record_slotted__ = bool(slots)
        cls.__match_args__ = tuple(item.name for item in found.values())
        if frozen and cls.__dict__.get("__hash__", MISSING) is None and "__eq__" in cls.__dict__:
            # Python set __hash__ = None for the class's own __eq__; a frozen dataclass still
            # hashes its fields then.
            cls.__hash__ = Record.__hash__
        if not frozen:  # as @dataclass(eq=True): assignable, and no hash (its key could change)
            cls.__setattr__ = object.__setattr__
            cls.__delattr__ = object.__delattr__
            if "__hash__" not in cls.__dict__:
                cls.__hash__ = None
        if order:
            cls.__lt__ = _compare(lambda left, right: left < right)
            cls.__le__ = _compare(lambda left, right: left <= right)
            cls.__gt__ = _compare(lambda left, right: left > right)
            cls.__ge__ = _compare(lambda left, right: left >= right)

    def __init__(self, *args, **kwargs) -> None:
        record_fields = self.__record_fields__
        if len(args) > len(record_fields):
            _refuse_positional(type(self), len(args))
        # not setattr: assignment is what a frozen record refuses; a slotted one is set below
        values = {} if self.__record_slotted__ else self.__dict__
        for item, value in zip(record_fields, args):
            values[item.name] = value
        missing = []
        taken = 0
        for item in record_fields[len(args):]:
            if item.name in kwargs:
                values[item.name] = kwargs[item.name]
                taken += 1
            elif item.default is not MISSING:
                values[item.name] = item.default
            elif item.default_factory is not MISSING:
                values[item.name] = item.default_factory()
            else:
                missing.append(item.name)
        if taken != len(kwargs):
            _refuse_keywords(type(self), kwargs, len(args))
        if missing:
            raise TypeError(f"{type(self).__qualname__}.__init__() missing {len(missing)} required positional "
                            f"argument{'s' if len(missing) > 1 else ''}: {_listed(missing)}")
        if self.__record_slotted__:
            for name, value in values.items():
                object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        values = ", ".join(f"{item.name}={getattr(self, item.name)!r}" for item in self.__record_fields__
                           if item.repr)
        return f"{type(self).__qualname__}({values})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _key(self) == _key(other)

    def __hash__(self) -> int:
        return hash(_key(self))


def _pseudo_field(annotation) -> bool:
    """Whether an annotation (a string under ``from __future__ import annotations``) is
    ``ClassVar``/``InitVar``, which a dataclass does not make a field and a record refuses."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "") or repr(annotation)
    head = text.split("[", 1)[0].rsplit(".", 1)[-1].strip()
    return head in ("ClassVar", "InitVar")


def _key(record: Record) -> tuple:
    return tuple(getattr(record, name) for name in record.__record_compared__)


def _compare(operator):
    def method(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return operator(_key(self), _key(other))

    return method


def _refuse_positional(cls: type, given: int) -> None:
    """Raise the TypeError of too many positional arguments, in Python's words (self counted)."""
    total = len(cls.__record_fields__)
    required = sum(1 for item in cls.__record_fields__ if item.default is MISSING and item.default_factory is MISSING)
    takes = f"{total + 1}" if required == total else f"from {required + 1} to {total + 1}"
    raise TypeError(f"{cls.__qualname__}.__init__() takes {takes} positional argument{'s' if total else ''} "
                    f"but {given + 1} were given")


def _refuse_keywords(cls: type, kwargs: dict, positional: int) -> None:
    """Raise the TypeError of a keyword argument that names no field, or a field given by position."""
    names = [item.name for item in cls.__record_fields__]
    for key in kwargs:
        if key not in names:
            raise TypeError(f"{cls.__qualname__}.__init__() got an unexpected keyword argument {key!r}")
        if key in names[:positional]:
            raise TypeError(f"{cls.__qualname__}.__init__() got multiple values for argument {key!r}")


def _listed(names: list[str]) -> str:
    """'a' / 'a' and 'b' / 'a', 'b', and 'c': as Python lists missing arguments."""
    quoted = [repr(name) for name in names]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def fields(record_or_class) -> tuple[Field, ...]:
    """The fields of a record or record class, in order (as ``dataclasses.fields``)."""
    found = getattr(record_or_class, "__record_fields__", None)
    if found is None:
        raise TypeError("must be called with a record type or instance")
    return found


def replace(record: Record, **changes):
    """A copy of ``record`` with ``changes`` (field name -> value), as ``dataclasses.replace``:
    a name that is not a field raises TypeError."""
    values = {item.name: getattr(record, item.name) for item in record.__record_fields__}
    for name in changes:
        if name not in values:
            raise TypeError(f"{type(record).__qualname__}.__init__() got an unexpected keyword argument {name!r}")
    values.update(changes)
    return type(record)(**values)


def asdict(record: Record) -> dict:
    """The record's fields as a dict (field name -> value), as ``dataclasses.asdict``: records
    within become dicts, lists, tuples (named ones too) and dicts are rebuilt with their items
    converted, anything else is deep-copied."""
    if not isinstance(record, Record):
        raise TypeError("asdict() should be called on record instances")
    return _plain(record)


def _plain(value):
    if isinstance(value, Record):
        return {item.name: _plain(getattr(value, item.name)) for item in value.__record_fields__}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*[_plain(item) for item in value])
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return type(value)((_plain(key), _plain(item)) for key, item in value.items())
    import copy  # only here: the run path never converts a record

    return copy.deepcopy(value)
