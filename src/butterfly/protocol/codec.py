"""A strict msgpack codec driven by dataclass annotations.

Peers may be Byzantine, so decoding checks everything before a message object exists:
the frame size, the kind, the exact field set, every field's type and size, and nested
messages recursively. Anything else raises `InvalidMessage` with the offending path, so a
log line says which peer sent what. Nothing is unpickled and no class is looked up by a
name the peer chose beyond the fixed table of kinds.

Signing uses a second, canonical form (a msgpack array of field values in declaration
order) so that signatures never depend on map ordering.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NewType, Union, get_args, get_origin, get_type_hints

import msgpack

from butterfly.types.errors import InvalidMessage

MAX_MESSAGE_BYTES = 1 << 20
"""Largest frame a node decodes; a new-view message of a 7-node cluster is ~100 KiB."""
MAX_ITEMS = 4096
MAX_BYTES_FIELD = 1 << 18
MAX_STR = 256
MAX_INT = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Size:
    """Inclusive byte-length bounds of a `bytes` field, used inside `Annotated`."""

    low: int
    high: int


Check = Callable[[Any, str], Any]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Per-class accessors, so encoding reads all fields in one C call."""

    kind: str
    tagged: bool
    names: tuple[str, ...]
    get_all: Callable[[Any], tuple[Any, ...]]
    nested_all: tuple[bool, ...]
    get_signed: Callable[[Any], tuple[Any, ...]]
    nested_signed: tuple[bool, ...]


def _scalar(tp: Any) -> bool:
    """True for field types whose values msgpack takes as they are."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    while isinstance(tp, NewType):
        tp = tp.__supertype__
    return tp in (int, float, bool, str, bytes)


def _fail(path: str, expected: str, value: object) -> typing.NoReturn:
    raise InvalidMessage(f"{path} must be {expected}, got {type(value).__name__}")


def _check_int(value: Any, path: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        if type(value) is int:
            raise InvalidMessage(f"{path} must be in [0, 2**63), got {value}")
        _fail(path, "a non-negative integer", value)
    return value


def _check_float(value: Any, path: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        _fail(path, "a finite number", value)
    return float(value)


def _check_bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        _fail(path, "a boolean", value)
    return value


def _check_str(value: Any, path: str) -> str:
    if type(value) is not str:
        _fail(path, "a string", value)
    if len(value) > MAX_STR:
        raise InvalidMessage(f"{path} is {len(value)} characters, the limit is {MAX_STR}")
    return value


def _bytes_check(size: Size) -> Check:
    def check(value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            _fail(path, "bytes", value)
        if not size.low <= len(value) <= size.high:
            raise InvalidMessage(f"{path} is {len(value)} bytes, expected {size.low}..{size.high}")
        return value

    return check


class Codec:
    """Encoder/decoder for a fixed set of message classes keyed by their `kind`."""

    def __init__(self, kinds: Mapping[str, type[Any]], *, version: int) -> None:
        self._kinds = dict(kinds)
        self._version = version
        self._fields: dict[type[Any], tuple[tuple[str, Check], ...]] = {}
        self._layouts: dict[type[Any], _Layout] = {}
        for cls in self._kinds.values():
            self._compile(cls)

    # --- schema ------------------------------------------------------------------------

    def _compile(self, cls: type[Any]) -> None:
        if cls in self._fields:
            return
        hints = get_type_hints(cls, include_extras=True)
        self._fields[cls] = ()  # placeholder: lets self-referencing types compile
        fields = dataclasses.fields(cls)
        specs = tuple((f.name, self._checker(hints[f.name])) for f in fields)
        self._fields[cls] = specs
        unsigned = frozenset(getattr(cls, "UNSIGNED", ())) | {"signature"}
        names = tuple(f.name for f in fields)
        signed = tuple(n for n in names if n not in unsigned)
        self._layouts[cls] = _Layout(
            kind=getattr(cls, "kind", cls.__name__),
            tagged=hasattr(cls, "kind"),
            names=names,
            get_all=operator.attrgetter(*names),
            nested_all=tuple(not _scalar(hints[n]) for n in names),
            get_signed=operator.attrgetter(*signed),
            nested_signed=tuple(not _scalar(hints[n]) for n in signed),
        )

    def _checker(self, tp: Any) -> Check:
        origin = get_origin(tp)
        if origin is Annotated:
            base, *meta = get_args(tp)
            size = next((m for m in meta if isinstance(m, Size)), None)
            if base is bytes and size is not None:
                return _bytes_check(size)
            return self._checker(base)
        if isinstance(tp, NewType):
            return self._checker(tp.__supertype__)
        if tp is bool:
            return _check_bool
        if tp is int:
            return _check_int
        if tp is float:
            return _check_float
        if tp is str:
            return _check_str
        if tp is bytes:
            return _bytes_check(Size(0, MAX_BYTES_FIELD))
        if origin is tuple:
            args = get_args(tp)
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"only tuple[X, ...] fields are supported, not {tp}")
            return self._tuple_check(self._checker(args[0]))
        if origin in (Union, types.UnionType):
            return self._union_check(get_args(tp))
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            self._compile(tp)
            return self._record_check(tp)
        raise TypeError(f"field type {tp!r} has no wire form")

    def _tuple_check(self, item: Check) -> Check:
        def check(value: Any, path: str) -> tuple[Any, ...]:
            if type(value) not in (list, tuple):
                _fail(path, "an array", value)
            if len(value) > MAX_ITEMS:
                raise InvalidMessage(f"{path} has {len(value)} items, the limit is {MAX_ITEMS}")
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

        return check

    def _union_check(self, args: tuple[Any, ...]) -> Check:
        optional = type(None) in args
        classes = [a for a in args if a is not type(None)]
        for cls in classes:
            if not (isinstance(cls, type) and hasattr(cls, "kind")):
                raise TypeError(f"unions may only hold message classes, not {cls!r}")
            self._compile(cls)
        allowed = {cls.kind: cls for cls in classes}

        def check(value: Any, path: str) -> Any:
            if value is None and optional:
                return None
            if type(value) is not dict:
                _fail(path, "a message map", value)
            kind = value.get("kind")
            cls = allowed.get(kind) if type(kind) is str else None
            if cls is None:
                raise InvalidMessage(f"{path} must be one of {sorted(allowed)}, got {kind!r}")
            return self._build(cls, value, path)

        return check

    def _record_check(self, cls: type[Any]) -> Check:
        def check(value: Any, path: str) -> Any:
            if type(value) is not dict:
                _fail(path, f"a {cls.__name__} map", value)
            kind = getattr(cls, "kind", None)
            if kind is not None and value.get("kind") != kind:
                raise InvalidMessage(f"{path} must be a {kind!r} message")
            return self._build(cls, value, path)

        return check

    def _build(self, cls: type[Any], raw: dict[Any, Any], path: str) -> Any:
        specs = self._fields[cls]
        expected = {name for name, _ in specs}
        if hasattr(cls, "kind"):
            expected.add("kind")
        keys = set(raw)
        if keys != expected:
            missing = sorted(str(k) for k in expected - keys)
            unknown = sorted(str(k) for k in keys - expected)
            problems = ([f"missing fields {missing}"] if missing else []) + (
                [f"unknown fields {unknown}"] if unknown else []
            )
            raise InvalidMessage(f"{path}: {', '.join(problems)}")
        values = {name: check(raw[name], f"{path}.{name}") for name, check in specs}
        if "version" in values and values["version"] != self._version:
            raise InvalidMessage(
                f"{path} speaks protocol version {values['version']}, this node speaks "
                f"{self._version}; upgrade the older node"
            )
        try:
            return cls(**values)
        except InvalidMessage:
            raise
        except (ValueError, TypeError) as e:  # semantic checks in __post_init__
            raise InvalidMessage(f"{path}: {e}") from e

    # --- encoding ----------------------------------------------------------------------

    def _wire(self, obj: Any) -> Any:
        """Nested maps and lists for msgpack; scalars pass through untouched."""
        layout = self._layouts.get(type(obj))
        if layout is None:
            return [self._wire(v) for v in obj] if type(obj) is tuple else obj
        values = layout.get_all(obj)
        out = {"kind": layout.kind} if layout.tagged else {}
        for name, value, nested in zip(layout.names, values, layout.nested_all, strict=True):
            out[name] = self._wire(value) if nested else value
        return out

    def _canonical(self, obj: Any, *, signed: bool = False) -> Any:
        """Arrays of field values in declaration order, the form signatures cover."""
        layout = self._layouts.get(type(obj))
        if layout is None:
            return [self._canonical(v) for v in obj] if type(obj) is tuple else obj
        if signed:
            values, nested_flags = layout.get_signed(obj), layout.nested_signed
        else:
            values, nested_flags = layout.get_all(obj), layout.nested_all
        out: list[Any] = [layout.kind]
        for value, nested in zip(values, nested_flags, strict=True):
            out.append(self._canonical(value) if nested else value)
        return out

    def encode(self, message: Any) -> bytes:
        if type(message) not in self._fields or not hasattr(message, "kind"):
            raise TypeError(f"{type(message).__name__} is not a registered message")
        data: bytes = msgpack.packb(self._wire(message), use_bin_type=True)
        return data

    def signing_bytes(self, message: Any) -> bytes:
        """Canonical bytes a signature covers: every field but the signature (and `UNSIGNED`)."""
        data: bytes = msgpack.packb(self._canonical(message, signed=True), use_bin_type=True)
        return data

    def decode(self, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
        if len(data) > max_bytes:
            raise InvalidMessage(
                f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit; dropped"
            )
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise InvalidMessage(f"message is not valid msgpack: {e}") from e
        if type(raw) is not dict:
            raise InvalidMessage(f"message must be a map, got {type(raw).__name__}")
        kind = raw.get("kind")
        cls = self._kinds.get(kind) if type(kind) is str else None
        if cls is None:
            raise InvalidMessage(f"unknown message kind {kind!r}; known: {sorted(self._kinds)}")
        return self._build(cls, raw, str(kind))
