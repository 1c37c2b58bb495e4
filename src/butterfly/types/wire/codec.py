"""One strict msgpack codec for every message kind, driven by dataclass annotations.

Peers may be Byzantine, so decoding checks everything before a message object exists:
the size, the kind, the exact field set, every field's type and bounds, and nested
messages recursively. Anything else raises the codec's error class (`WireFormatError` for
frame bodies, `InvalidMessage` for agreement messages, `InvalidCommand` for ordered
commands: each the error its callers already catch) with the offending path, so a log
line says which peer sent what. Nothing is unpickled and no class is looked up by a name
the peer chose beyond the fixed table of kinds.

Checkers (`checks.py`) are compiled once per class at import; reflecting on annotations
per message cost 40 µs a frame.

Two encodings: the map form (`encode`, or `to_body` without the kind for a frame
header that carries the kind beside it) and the canonical form that signatures cover (a
msgpack array of field values in declaration order, so signatures never depend on map
ordering).

A class may name fields in `OMIT_EMPTY` (a ClassVar): the map form leaves such a field
out while it is empty, and decoding takes a missing one as its (empty) default. An
optional feature's field (a step's trace context) then costs no byte while it is off.
Every other field must be present, exactly as before; the canonical form keeps them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import msgpack
import msgspec

from butterfly.types.errors import ButterflyError
from butterfly.types.wire.checks import (
    MAX_ITEMS,
    MAX_MESSAGE_BYTES,
    Check,
    Fail,
    bool_check,
    bytes_check,
    fail,
    fast_check,
    fields_of,
    float_check,
    int_check,
    plain,
    shape,
    str_check,
)
from butterfly.types.wire.mirror import DECODE_ERRORS, Mirrors


@dataclass(frozen=True, slots=True)
class _Layout:
    """Per-class accessors and field checks, so encoding reads all fields in one C call."""

    kind: str
    tagged: bool
    names: tuple[str, ...]
    specs: tuple[tuple[str, Check, str], ...]  # name, check, path when at the top
    keys: frozenset[str]  # the map form's keys, "kind" included when tagged
    body_keys: frozenset[str]  # the same without "kind"
    version_at: int  # index of the `version` field, or -1
    plain: bool  # every field is a scalar or a tuple of scalars: encoding copies values
    get_all: Callable[[Any], tuple[Any, ...]]
    nested_all: tuple[bool, ...]
    get_signed: Callable[[Any], tuple[Any, ...]]
    nested_signed: tuple[bool, ...]
    omit: tuple[tuple[str, Any], ...]  # OMIT_EMPTY fields and their empty defaults
    bare_keys: frozenset[str]  # `keys` without the OMIT_EMPTY fields
    bare_body_keys: frozenset[str]


class Codec:
    """Encoder/decoder for a fixed set of message classes keyed by their `kind`.

    `error` is the exception class every refusal raises; `version` is the protocol version
    a `version` field must carry.
    """

    def __init__(self, kinds: Mapping[str, type[Any]], *, version: int, error: Fail) -> None:
        self._kinds = dict(kinds)
        self._version = version
        self._error = error
        self._layouts: dict[type[Any], _Layout] = {}
        self._compiling: set[type[Any]] = set()
        for kind, cls in self._kinds.items():
            if getattr(cls, "kind", None) != kind:
                raise TypeError(f"{cls.__name__} is registered as {kind!r}, not its own kind")
            self._compile(cls)
        self._plain = {  # registered kinds whose fields are all scalars or tuples of them
            cls: layout.names
            for cls in self._kinds.values()
            if (layout := self._layouts[cls]).plain
        }
        self._omit = {  # registered kinds with fields left out of the map form when empty
            cls: tuple(name for name, _ in layout.omit)
            for cls in self._kinds.values()
            if (layout := self._layouts[cls]).omit
        }
        self._mirrors = Mirrors(self._kinds, version=version).bodies

    @property
    def kinds(self) -> Mapping[str, type[Any]]:
        return self._kinds

    # --- schema ------------------------------------------------------------------------

    def _compile(self, cls: type[Any]) -> None:
        if cls in self._layouts or cls in self._compiling:
            return  # compiled, or being compiled (a self-referencing type)
        self._compiling.add(cls)
        hints = get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        names = tuple(f.name for f in fields)
        kind = getattr(cls, "kind", cls.__name__)
        specs = tuple((n, self._checker(hints[n]), f"{kind}.{n}") for n in names)
        unsigned = frozenset(getattr(cls, "UNSIGNED", ())) | {"signature"}
        signed = tuple(n for n in names if n not in unsigned)
        tagged = hasattr(cls, "kind")
        defaults = {f.name: f.default for f in fields}
        omit = tuple((n, defaults[n]) for n in getattr(cls, "OMIT_EMPTY", ()))
        if any(n not in names or bool(d) or d is dataclasses.MISSING for n, d in omit):
            raise TypeError(f"{cls.__name__}.OMIT_EMPTY names a field without an empty default")
        omitted = {n for n, _ in omit}
        self._layouts[cls] = _Layout(
            kind=kind,
            tagged=tagged,
            names=names,
            specs=specs,
            keys=frozenset(names) | ({"kind"} if tagged else set()),
            body_keys=frozenset(names),
            version_at=names.index("version") if "version" in names else -1,
            plain=all(plain(hints[n]) for n in names),
            get_all=fields_of(names),
            nested_all=tuple(not plain(hints[n]) for n in names),
            get_signed=fields_of(signed),
            nested_signed=tuple(not plain(hints[n]) for n in signed),
            omit=omit,
            bare_keys=(frozenset(names) | ({"kind"} if tagged else set())) - omitted,
            bare_body_keys=frozenset(names) - omitted,
        )
        self._compiling.discard(cls)

    def _checker(self, tp: Any) -> Check:
        wire = shape(tp)
        match wire.kind:
            case "bool":
                return bool_check(self._error)
            case "int":
                return int_check(self._error)
            case "float":
                return float_check(self._error)
            case "str":
                assert wire.size is not None
                return str_check(self._error, wire.size.high)
            case "bytes":
                assert wire.size is not None
                return bytes_check(self._error, wire.size)
            case "array":
                return self._tuple_check(self._checker(wire.of[0]), fast_check(wire.of[0]))
            case "union":
                return self._union_check(wire.of, wire.optional)
            case _:
                self._compile(wire.of[0])
                return self._record_check(wire.of[0])

    def _tuple_check(self, item: Check, fast: Callable[[Any], bool] | None) -> Check:
        def check(value: Any, path: str) -> tuple[Any, ...]:
            if type(value) not in (list, tuple):
                fail(self._error, path, "an array", value)
            if len(value) > MAX_ITEMS:
                raise self._error(f"{path} has {len(value)} items, the limit is {MAX_ITEMS}")
            if not value:
                return ()
            if fast is not None and fast(value):
                return tuple(value)
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

        return check

    def _union_check(self, classes: tuple[Any, ...], optional: bool) -> Check:
        for cls in classes:
            self._compile(cls)
        allowed = {cls.kind: cls for cls in classes}

        def check(value: Any, path: str) -> Any:
            if value is None and optional:
                return None
            if type(value) is not dict:
                fail(self._error, path, "a message map", value)
            kind = value.get("kind")
            cls = allowed.get(kind) if type(kind) is str else None
            if cls is None:
                raise self._error(f"{path} must be one of {sorted(allowed)}, got {kind!r}")
            return self._build(cls, value, path, tagged=True, top=False)

        return check

    def _record_check(self, cls: type[Any]) -> Check:
        def check(value: Any, path: str) -> Any:
            if type(value) is not dict:
                fail(self._error, path, f"a {cls.__name__} map", value)
            layout = self._layouts[cls]
            if layout.tagged and value.get("kind") != layout.kind:
                raise self._error(f"{path} must be a {layout.kind!r} message")
            return self._build(cls, value, path, tagged=layout.tagged, top=False)

        return check

    def _build(
        self, cls: type[Any], raw: dict[Any, Any], path: str, *, tagged: bool, top: bool
    ) -> Any:
        layout = self._layouts[cls]
        expected = layout.keys if tagged else layout.body_keys
        if raw.keys() != expected and layout.omit:
            bare = layout.bare_keys if tagged else layout.bare_body_keys
            if bare <= raw.keys() <= expected:  # only OMIT_EMPTY fields left out
                for name, empty in layout.omit:
                    raw.setdefault(name, empty)
        if raw.keys() != expected:
            keys = set(raw)
            optional = {name for name, _ in layout.omit}  # never missing: they may go unsent
            missing = sorted(str(k) for k in expected - keys - optional)
            unknown = sorted(str(k) for k in keys - expected)
            problems = ([f"missing fields {missing}"] if missing else []) + (
                [f"unknown fields {unknown}"] if unknown else []
            )
            raise self._error(f"{path}: {', '.join(problems)}")
        if top:  # the hot path: every frame body; no per-field path strings to format
            values = [check(raw[name], where) for name, check, where in layout.specs]
        else:
            values = [check(raw[name], f"{path}.{name}") for name, check, _ in layout.specs]
        if layout.version_at >= 0 and values[layout.version_at] != self._version:
            raise self._error(
                f"{path} speaks protocol version {values[layout.version_at]}, this node "
                f"speaks {self._version}; upgrade the older node"
            )
        try:
            return cls(*values)
        except ButterflyError:
            raise
        except (ValueError, TypeError) as e:  # semantic checks in __post_init__
            raise self._error(f"{path}: {e}") from e

    # --- encoding ----------------------------------------------------------------------

    def _wire(self, obj: Any) -> Any:
        """Nested maps and lists for msgpack; scalars pass through untouched."""
        layout = self._layouts.get(type(obj))
        if layout is None:
            return [self._wire(v) for v in obj] if type(obj) is tuple else obj
        return self._map(obj, layout, {"kind": layout.kind} if layout.tagged else {})

    def _map(self, obj: Any, layout: _Layout, out: dict[str, Any]) -> dict[str, Any]:
        values = layout.get_all(obj)
        if layout.plain:
            out.update(zip(layout.names, values, strict=False))
        else:
            for name, value, nested in zip(layout.names, values, layout.nested_all, strict=True):
                out[name] = self._wire(value) if nested else value
        for name, _ in layout.omit:
            if not out[name]:
                del out[name]
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

    def _registered(self, message: Any) -> _Layout:
        layout = self._layouts.get(type(message))
        if layout is None or self._kinds.get(layout.kind) is not type(message):
            raise TypeError(f"{type(message).__name__} is not a registered message")
        return layout

    def encode(self, message: Any) -> bytes:
        """The map form, kind included."""
        self._registered(message)
        data: bytes = msgpack.packb(self._wire(message), use_bin_type=True)
        return data

    def to_body(self, message: Any) -> dict[str, Any]:
        """The map form without the kind, for a frame header that names the kind itself."""
        names = self._plain.get(type(message))
        if names is not None:  # every data-path frame (measured: faster than dict(zip(...)))
            body = {name: getattr(message, name) for name in names}
            omit = self._omit.get(type(message))
            if omit is not None:
                for name in omit:
                    if not body[name]:
                        del body[name]
            return body
        return self._map(message, self._registered(message), {})

    def signing_bytes(self, message: Any) -> bytes:
        """Canonical bytes a signature covers: every field but the signature (and `UNSIGNED`)."""
        data: bytes = msgpack.packb(self._canonical(message, signed=True), use_bin_type=True)
        return data

    def decode(self, data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
        if len(data) > max_bytes:
            raise self._error(
                f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit; dropped"
            )
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise self._error(f"message is not valid msgpack: {e}") from e
        if type(raw) is not dict:
            raise self._error(f"message must be a map, got {type(raw).__name__}")
        kind = raw.get("kind")
        return self._build(self._class_of(kind), raw, str(kind), tagged=True, top=True)

    def from_body(self, kind: Any, body: Any) -> Any:
        """A message from an untrusted (kind, body) pair, as `to_body` wrote it."""
        cls = self._class_of(kind)
        if type(body) is not dict:
            fail(self._error, f"{kind} body", "a map", body)
        return self._build(cls, body, kind, tagged=False, top=True)

    def from_body_bytes(self, kind: Any, data: bytes | msgspec.Raw) -> Any:
        """`from_body` of a body still in msgpack (`data`): checked in C by its mirror
        (types.wire.mirror); a body the mirror refuses is decoded again by `from_body`,
        whose error names the problem."""
        fast = self._mirrors.get(kind) if type(kind) is str else None
        if fast is not None:
            decode, convert = fast
            try:
                return convert(decode(data))
            except (*DECODE_ERRORS, ValueError, TypeError):
                pass
            except RecursionError:  # msgspec walks nested values up to the recursion limit
                raise self._error(f"{kind} body nests too deeply") from None
        try:
            body = msgpack.unpackb(data)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise self._error(f"{kind} body is not valid msgpack: {e}") from e
        return self.from_body(kind, body)

    def _class_of(self, kind: Any) -> type[Any]:
        cls = self._kinds.get(kind) if type(kind) is str else None
        if cls is None:
            raise self._error(f"unknown message kind {kind!r}; known: {sorted(self._kinds)}")
        return cls
