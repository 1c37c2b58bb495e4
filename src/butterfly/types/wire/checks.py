"""Field checkers the codec compiles once per message class, and the wire's limits.

Each checker takes an untrusted value and the path to name in an error, and returns the
value (a list as a tuple, an int as a float where a float is declared) or raises the
codec's error class. Exact types: a bool is not an int, an int is not a str.

Tuples of scalars are checked whole by `fast_check` in C-level passes (`map(type, ...)`,
`min`, `max`) and walked item by item only when that fails, to name the bad index:
per-item calls were most of a stage step's decode time.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NewType, get_args, get_origin

from butterfly.types.errors import ButterflyError

MAX_MESSAGE_BYTES = 1 << 20
"""Largest agreement message a node decodes; a 7-node cluster's new-view is ~100 KiB."""
MAX_ITEMS = 4096
MAX_BYTES_FIELD = 1 << 18
MAX_STR = 256
MAX_INT = (1 << 63) - 1

Check = Callable[[Any, str], Any]
Fail = type[ButterflyError]


@dataclass(frozen=True, slots=True)
class Size:
    """Inclusive length bounds of a `bytes` (bytes) or `str` (characters) field, inside
    `Annotated`."""

    low: int
    high: int


def fail(error: Fail, path: str, expected: str, value: object) -> typing.NoReturn:
    raise error(f"{path} must be {expected}, got {type(value).__name__}")


def int_check(error: Fail) -> Check:
    def check(value: Any, path: str) -> int:
        if type(value) is not int or not 0 <= value <= MAX_INT:
            if type(value) is int:
                raise error(f"{path} must be in [0, 2**63), got {value}")
            fail(error, path, "a non-negative integer", value)
        return value

    return check


def float_check(error: Fail) -> Check:
    def check(value: Any, path: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            fail(error, path, "a finite number", value)
        return float(value)

    return check


def bool_check(error: Fail) -> Check:
    def check(value: Any, path: str) -> bool:
        if type(value) is not bool:
            fail(error, path, "a boolean", value)
        return value

    return check


def str_check(error: Fail, limit: int) -> Check:
    def check(value: Any, path: str) -> str:
        if type(value) is not str:
            fail(error, path, "a string", value)
        if len(value) > limit:
            raise error(f"{path} is {len(value)} characters, the limit is {limit}")
        return value

    return check


def bytes_check(error: Fail, size: Size) -> Check:
    def check(value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            fail(error, path, "bytes", value)
        if not size.low <= len(value) <= size.high:
            raise error(f"{path} is {len(value)} bytes, expected {size.low}..{size.high}")
        return value

    return check


@dataclass(frozen=True, slots=True)
class Shape:
    """What a field's annotation means on the wire, read once for the codec's checks
    and their C mirror (types.wire.mirror) alike.

    `kind` is bool, int, float, str (at most `size.high` characters), bytes (within
    `size`), array (of `of[0]`), union (of the message classes `of`, `optional` when
    None may stand in) or record (the dataclass `of[0]`)."""

    kind: str
    size: Size | None = None
    of: tuple[Any, ...] = ()
    optional: bool = False


def shape(tp: Any) -> Shape:
    """`tp`'s wire shape; TypeError for an annotation with no wire form."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        size = next((m for m in meta if isinstance(m, Size)), None)
        base = strip(base)
        if size is not None and base in (bytes, str):
            return Shape(base.__name__, size)
        return shape(base)
    if isinstance(tp, NewType):
        return shape(tp.__supertype__)
    if tp in (bool, int, float):
        return Shape(tp.__name__)
    if tp is str:
        return Shape("str", Size(0, MAX_STR))
    if tp is bytes:
        return Shape("bytes", Size(0, MAX_BYTES_FIELD))
    if origin is tuple:
        args = get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[X, ...] fields are supported, not {tp}")
        return Shape("array", of=(args[0],))
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        classes = tuple(a for a in args if a is not type(None))
        for cls in classes:
            if not (isinstance(cls, type) and hasattr(cls, "kind")):
                raise TypeError(f"unions may only hold message classes, not {cls!r}")
        return Shape("union", of=classes, optional=type(None) in args)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return Shape("record", of=(tp,))
    raise TypeError(f"field type {tp!r} has no wire form")


def fields_of(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    """The named attributes of an object as a tuple, in one C call (`attrgetter`, which
    returns a bare value for one name, so that case is wrapped)."""
    if len(names) > 1:
        return operator.attrgetter(*names)
    if not names:
        return lambda obj: ()
    get = operator.attrgetter(names[0])
    return lambda obj: (get(obj),)


def strip(tp: Any) -> Any:
    """The wire type under `Annotated` and `NewType` (a NodeId travels as an int)."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    while isinstance(tp, NewType):
        tp = tp.__supertype__
    return tp


def plain(tp: Any) -> bool:
    """True for field types msgpack takes as they are: scalars and tuples of scalars."""
    tp = strip(tp)
    if get_origin(tp) is tuple:
        return plain(get_args(tp)[0])
    return tp in (int, float, bool, str, bytes)


def fast_check(tp: Any) -> Callable[[Any], bool] | None:
    """A cheap all-is-well test of a whole tuple of `tp` items, or None for records; False
    sends the tuple to the item-by-item check, which names what is wrong."""
    low, high = 0, MAX_STR
    if get_origin(tp) is Annotated:
        size = next((m for m in get_args(tp)[1:] if isinstance(m, Size)), None)
        if size is not None:
            low, high = size.low, size.high
    base = strip(tp)
    if base is bytes and high == MAX_STR and get_origin(tp) is not Annotated:
        high = MAX_BYTES_FIELD
    if base is int:
        return lambda v: {*map(type, v)} == {int} and min(v) >= 0 and max(v) <= MAX_INT
    if base is float:
        return lambda v: {*map(type, v)} == {float} and math.isfinite(sum(v))
    if base is bool:
        return lambda v: {*map(type, v)} == {bool}
    if base in (str, bytes):
        kind = base
        return lambda v: (
            {*map(type, v)} == {kind} and low <= min(map(len, v)) and max(map(len, v)) <= high
        )
    return None
