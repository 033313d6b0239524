"""berth.record behaves as ``@dataclass(frozen=True)`` does for what berth's records use:
each test builds the same class both ways and compares (dataclasses is the reference)."""

import copy
import dataclasses
import pickle
from collections import namedtuple

import pytest

from berth.config.load import effective_values
from berth.config.settings import Mount, Settings, SitePolicy
from berth.oci.digest import Digest
from berth.record import FrozenInstanceError, Record, asdict, field, fields, replace


class Point(Record):
    x: int
    label: str = "p"
    notes: dict = field(default_factory=dict, compare=False)

    def moved(self, by: int) -> "Point":
        return replace(self, x=self.x + by)


@dataclasses.dataclass(frozen=True)
class DataPoint:
    x: int
    label: str = "p"
    notes: dict = dataclasses.field(default_factory=dict, compare=False)


class Three(Record):
    a: int
    b: int
    c: int


@dataclasses.dataclass(frozen=True)
class DataThree:
    a: int
    b: int
    c: int


class Version(Record, order=True):
    major: int
    minor: int


@dataclasses.dataclass(frozen=True, order=True)
class DataVersion:
    major: int
    minor: int


PAIRS = [(Point, DataPoint), (Three, DataThree), (Version, DataVersion)]


def _error(call) -> str:
    """The TypeError ``call`` raises, its class names without "Data"; "none" when it raises none."""
    try:
        call()
    except TypeError as error:
        return str(error).replace("Data", "")
    return "none"


def test_construction_defaults_and_repr_as_a_dataclass():
    assert repr(Point(1)) == repr(DataPoint(1)).replace("DataPoint", "Point") == "Point(x=1, label='p', notes={})"
    assert repr(Point(2, "q", notes={"a": 1})) == "Point(x=2, label='q', notes={'a': 1})"
    assert Point(x=3, label="r").label == "r"
    assert Point(1).notes is not Point(1).notes  # a factory's value per instance
    assert Point.label == "p" and not hasattr(Point, "notes")  # class attributes as dataclasses leaves them
    assert [item.name for item in fields(Point)] == [item.name for item in dataclasses.fields(DataPoint)]
    assert [item.name for item in fields(Point(1))] == ["x", "label", "notes"]
    assert fields(Point)[1].default == "p" and fields(Point)[0].default is fields(Point)[2].default


@pytest.mark.parametrize("record, data", PAIRS)
def test_wrong_arguments_raise_the_errors_of_a_dataclass(record, data):
    calls = (lambda cls: cls(), lambda cls: cls(1), lambda cls: cls(1, 2, 3, 4), lambda cls: cls(1, x=2, a=2),
             lambda cls: cls(1, 2, nothing=3), lambda cls: cls(1, 2, 3))
    outcomes = [(_error(lambda: call(record)), _error(lambda: call(data))) for call in calls]
    assert [mine for mine, _ in outcomes] == [theirs for _, theirs in outcomes]
    assert sum(mine != "none" for mine, _ in outcomes) >= 4  # the control: most of them are wrong


def test_fields_are_frozen():
    point = Point(1)
    for change in (lambda: setattr(point, "x", 2), lambda: delattr(point, "x"), lambda: setattr(point, "new", 1)):
        with pytest.raises(FrozenInstanceError) as caught:
            change()
        assert isinstance(caught.value, AttributeError)
    assert point.x == 1 and not hasattr(point, "new")
    assert str(_frozen(lambda: setattr(Point(1), "x", 2))) == str(_frozen(lambda: setattr(DataPoint(1), "x", 2)))


def _frozen(change) -> Exception:
    with pytest.raises(AttributeError) as caught:
        change()
    return caught.value


def test_equality_and_hash_compare_the_compared_fields_of_the_same_class():
    assert Point(1, notes={"a": 1}) == Point(1) and hash(Point(1, notes={"a": 1})) == hash(Point(1))
    assert Point(1) != Point(2) and Point(1) != Point(1, "q")
    assert Three(1, 2, 3) != (1, 2, 3) and Three(1, 2, 3) != DataThree(1, 2, 3)

    class OtherThree(Record):
        a: int
        b: int
        c: int

    assert Three(1, 2, 3) != OtherThree(1, 2, 3)  # as dataclasses: another class is never equal
    assert len({Three(1, 2, 3), Three(1, 2, 3), Three(1, 2, 4)}) == 2
    with pytest.raises(TypeError):
        Three(1, 2, 3) < Three(1, 2, 4)  # no order unless asked for


def test_order_as_a_dataclass_with_order():
    versions = [Version(2, 0), Version(1, 10), Version(1, 2)]
    data = [DataVersion(2, 0), DataVersion(1, 10), DataVersion(1, 2)]
    assert [(v.major, v.minor) for v in sorted(versions)] == [(v.major, v.minor) for v in sorted(data)]
    assert Version(1, 2) <= Version(1, 2) < Version(1, 3) and Version(2, 0) >= Version(1, 9) > Version(1, 8)
    with pytest.raises(TypeError):
        Version(1, 2) < (1, 3)
    assert sorted([Digest("sha256", "b" * 64), Digest("sha256", "a" * 64)])[0].hex == "a" * 64


def test_replace_as_dataclasses_replace():
    point = Point(1, notes={"a": 1})
    assert replace(point, label="q") == Point(1, "q") and replace(point, label="q").notes == {"a": 1}
    assert point.moved(2).x == 3 and point.x == 1
    assert _error(lambda: replace(point, y=1)) == _error(lambda: dataclasses.replace(DataPoint(1), y=1))


def test_copy_and_pickle_keep_the_values():
    point = Point(1, notes={"a": [1]})
    for copied in (copy.copy(point), copy.deepcopy(point), pickle.loads(pickle.dumps(point))):
        assert copied == point and copied.notes == {"a": [1]} and type(copied) is Point
    assert copy.deepcopy(point).notes["a"] is not point.notes["a"]


def test_a_subclass_adds_fields_after_its_base_and_its_own_methods_win():
    class Labelled(Point):
        extra: int = 0

        def __repr__(self) -> str:
            return f"<{self.x}>"

    assert [item.name for item in fields(Labelled)] == ["x", "label", "notes", "extra"]
    assert Labelled(1, extra=2).extra == 2 and repr(Labelled(1)) == "<1>" and Labelled(1) != Point(1)
    assert str(Digest("sha256", "a" * 64)) == "sha256:" + "a" * 64  # Digest's own __str__


def test_a_field_without_default_after_one_with_is_refused():
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        class Wrong(Record):
            a: int = 1
            b: int


def test_settings_keep_their_semantics():
    """The settings model's records: frozen, compared without ``sources``, shown by `berth config
    show` as tables (not as lists, as a tuple would be)."""
    settings = Settings(sources={"runtime": "default"})
    assert settings == Settings() and settings.policy == SitePolicy()
    with pytest.raises(AttributeError):
        settings.runtime = "runc"
    changed = replace(settings, policy=replace(settings.policy, mounts=(Mount("/srv", "/srv"),)))
    assert changed != settings and changed.policy.mounts[0].read_only is True
    rows = {key: value for key, value, _ in effective_values(changed)}
    assert rows["policy.mounts[0]"] == {"source": "/srv", "destination": "/srv", "read_only": True, "optional": False}


class Tally(Record, frozen=False):
    name: str
    count: int = 0
    secret: str = field(default="", repr=False)
    seen: list = field(default_factory=list)


@dataclasses.dataclass
class DataTally:
    name: str
    count: int = 0
    secret: str = dataclasses.field(default="", repr=False)
    seen: list = dataclasses.field(default_factory=list)


def test_a_mutable_record_as_a_dataclass_without_frozen():
    tally, data = Tally("a", secret="s3cret"), DataTally("a", secret="s3cret")
    for each in (tally, data):
        each.count += 2
        each.seen.append("x")
        each.extra = 1  # as a plain dataclass: any attribute
        del each.extra
    assert repr(tally) == repr(data).replace("DataTally", "Tally") == "Tally(name='a', count=2, seen=['x'])"
    assert "s3cret" not in repr(tally) and tally.secret == "s3cret"
    assert tally == Tally("a", 2, "s3cret", ["x"]) and tally != Tally("a", 3, "s3cret", ["x"])
    assert Tally.__hash__ is None is DataTally.__hash__  # mutable: unhashable, as eq=True without frozen
    with pytest.raises(TypeError, match="unhashable"):
        hash(tally)
    assert _error(lambda: Tally()) == _error(lambda: DataTally())
    assert replace(tally, count=5).count == 5 and tally.count == 2
    assert pickle.loads(pickle.dumps(tally)) == tally


def test_frozen_and_mutable_records_do_not_mix_as_dataclasses_refuse():
    with pytest.raises(TypeError, match="cannot inherit non-frozen record from a frozen one"):
        class Thawed(Point, frozen=False):
            extra: int = 0
    with pytest.raises(TypeError, match="cannot inherit frozen record from a non-frozen one"):
        class Frozen(Tally):
            extra: int = 0
    with pytest.raises(TypeError, match="non-frozen dataclass from a frozen one"):  # the reference
        @dataclasses.dataclass
        class DataThawed(DataPoint):
            extra: int = 0


class Slotted(Record, frozen=False):
    __slots__ = ("layer", "kind")
    layer: int
    kind: str


@dataclasses.dataclass(slots=True)
class DataSlotted:
    layer: int
    kind: str


def test_a_slotted_mutable_record_as_a_dataclass_with_slots():
    node, data = Slotted(1, "file"), DataSlotted(1, "file")
    for each in (node, data):
        each.layer, each.kind = 2, "dir"
        assert not hasattr(each, "__dict__")
        with pytest.raises(AttributeError):
            each.other = 1
    assert repr(node) == repr(data).replace("DataSlotted", "Slotted") and node == Slotted(2, "dir")
    assert copy.copy(node) == node and pickle.loads(pickle.dumps(node)) == node
    assert [item.name for item in fields(Slotted)] == ["layer", "kind"] and Slotted(kind="x", layer=0).layer == 0
    with pytest.raises(TypeError, match="mutable records"):
        class FrozenSlotted(Record):
            __slots__ = ("a",)
            a: int


Pair = namedtuple("Pair", "left right")


class Outer(Record):
    point: Point
    pairs: tuple
    by_name: dict
    items: list


@dataclasses.dataclass(frozen=True)
class DataOuter:
    point: DataPoint
    pairs: tuple
    by_name: dict
    items: list


def test_asdict_as_dataclasses_asdict():
    inner = {"a": [1, {"b": 2}]}
    mine = asdict(Outer(Point(1, notes=inner), (Pair(1, Point(2)), 3), {"k": Point(3)}, [Point(4), "s"]))
    theirs = dataclasses.asdict(DataOuter(DataPoint(1, notes=inner), (Pair(1, DataPoint(2)), 3),
                                          {"k": DataPoint(3)}, [DataPoint(4), "s"]))
    assert mine == theirs and type(mine["pairs"][0]) is Pair is type(theirs["pairs"][0])
    assert mine["point"] == {"x": 1, "label": "p", "notes": {"a": [1, {"b": 2}]}}
    assert mine["point"]["notes"]["a"] is not inner["a"]  # copies, as dataclasses makes
    assert asdict(Tally("a", secret="s")) == dataclasses.asdict(DataTally("a", secret="s"))  # repr=False kept
    assert _error(lambda: asdict(Pair(1, 2))).startswith("asdict() should be called on")



def test_an_unhashable_default_is_refused_as_a_dataclass_refuses_it():
    for default in ([], {}, set()):
        with pytest.raises(ValueError) as expected:
            dataclasses.make_dataclass("D", [("xs", object, dataclasses.field(default=default))], frozen=True)
        with pytest.raises(ValueError) as got:
            type("R", (Record,), {"__annotations__": {"xs": "list"}, "xs": default})
        assert str(got.value) == str(expected.value).replace("D", "R")
    hashable = type("R", (Record,), {"__annotations__": {"xs": "tuple"}, "xs": ()})
    assert hashable().xs == ()


def test_a_frozen_record_with_its_own_eq_still_hashes_as_a_frozen_dataclass_does():
    def eq(self, other):
        return isinstance(other, type(self)) and self.a % 10 == other.a % 10

    data = dataclasses.make_dataclass("D", [("a", int)], frozen=True, namespace={"__eq__": eq})
    record = type("R", (Record,), {"__annotations__": {"a": "int"}, "__eq__": eq})
    assert hash(data(3)) == hash((3,)) and hash(record(3)) == hash((3,))
    assert record(3) == record(13)  # its own __eq__ wins
    mutable = type("M", (Record,), {"__annotations__": {"a": "int"}, "__eq__": eq}, frozen=False)
    with pytest.raises(TypeError):
        hash(mutable(3))


@pytest.mark.parametrize("annotation", ["ClassVar[int]", "typing.ClassVar[int]", "InitVar[int]",
                                        "dataclasses.InitVar[int]"])
def test_classvar_and_initvar_are_refused_not_made_fields(annotation):
    with pytest.raises(TypeError, match="ClassVar and InitVar are not supported"):
        type("R", (Record,), {"__annotations__": {"a": annotation}, "a": 1})


def test_match_args_name_the_fields_as_a_dataclass_does():
    data = dataclasses.make_dataclass("D", [("a", int), ("b", int, dataclasses.field(default=0))], frozen=True)
    record = type("R", (Record,), {"__annotations__": {"a": "int", "b": "int"}, "b": 0})
    assert record.__match_args__ == data.__match_args__ == ("a", "b")
    match record(1, 2):
        case record(x, y):
            assert (x, y) == (1, 2)
        case _:
            pytest.fail("a positional pattern did not match")
