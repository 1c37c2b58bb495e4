"""The wire schema's checks compiled into msgspec structs, so a body is checked in C.

Why: on two cores shared by five processes a frame is decoded on caches another process
has just flushed. The codec's field checks (`codec.py`, `checks.py`) then cost a middle
stage 29 µs of a stage step's 52 µs decode, against 7 µs warm; msgspec decodes and
checks the same body into a struct in 7 µs flushed (AMD EPYC, docs/PERFORMANCE-LOG.md,
"Frame bodies checked in C").

Each check of the codec has its translation here: an int is 0 <= i < 2**63 and never a
bool, a float finite, a string at most its characters, bytes within their sizes, an
array at most `MAX_ITEMS` items, a map exactly its fields (an `OMIT_EMPTY` field may be
missing and takes its empty default), a nested tagged record must name its kind, and a
union of message classes is told apart by that kind. The codec keeps the last word: a
body the mirror refuses goes to the codec's own checks, which name the problem (or take
the body, should the mirror be stricter anywhere), a `version` field must be this
node's protocol version, and a message's own `__post_init__`
still runs on every message built. Tests hold the two to the same verdict on random
bodies. A class the mirror cannot express (a type it has no translation for, a
self-reference) has no mirror, and the codec alone decodes it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Union, get_type_hints

import msgspec

from butterfly.types.wire.checks import MAX_INT, MAX_ITEMS, fields_of, shape

Convert = Callable[[Any], Any]

_INT = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
_FLOAT = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError)


def _same(value: Any) -> Any:
    return value


class Mirrors:
    """A decoder per message kind of `kinds` (its body: the map without the kind), and
    how to turn what it decodes into the message class."""

    def __init__(self, kinds: Mapping[str, type[Any]], *, version: int) -> None:
        """`version`: the protocol version a `version` field must carry."""
        self._version = version
        self._structs: dict[tuple[type[Any], str], tuple[type[msgspec.Struct], Convert]] = {}
        self._building: set[type[Any]] = set()
        self.bodies: dict[str, tuple[Callable[[Any], Any], Convert]] = {}
        for kind, cls in kinds.items():
            try:
                struct, convert = self._struct(cls, "body")
            except TypeError:
                continue  # beyond the mirror: the codec decodes this kind alone
            self.bodies[kind] = (msgspec.msgpack.Decoder(struct).decode, convert)

    def _struct(self, cls: type[Any], form: str) -> tuple[type[msgspec.Struct], Convert]:
        """`form`: "body" (a frame body: no kind), "record" (nested: a required kind
        when the class has one) or "member" (one of a union's classes, told apart by
        its kind)."""
        built = self._structs.get((cls, form))
        if built is not None:
            return built
        if cls in self._building:
            raise TypeError(f"{cls.__name__} refers to itself")
        self._building.add(cls)
        try:
            hints = get_type_hints(cls, include_extras=True)
            omit = set(getattr(cls, "OMIT_EMPTY", ()))
            fields: list[tuple[Any, ...]] = []
            converts: list[Convert] = []
            for f in dataclasses.fields(cls):
                tp, field_convert = self._type(hints[f.name])
                fields.append((f.name, tp, f.default) if f.name in omit else (f.name, tp))
                converts.append(field_convert)
            kind = getattr(cls, "kind", None)
            options: dict[str, Any] = {"kw_only": True, "forbid_unknown_fields": True}
            if kind is not None and form == "record":
                fields.append(("kind", Literal[kind]))
            if kind is not None and form == "member":
                options.update(tag_field="kind", tag=kind)
            struct = msgspec.defstruct(f"{cls.__name__}Wire", fields, **options)
        finally:
            self._building.discard(cls)
        convert = _builder(cls, tuple(converts))
        if any(f.name == "version" for f in dataclasses.fields(cls)):
            convert = self._versioned(convert)
        self._structs[(cls, form)] = (struct, convert)
        return struct, convert

    def _versioned(self, convert: Convert) -> Convert:
        def checked(s: Any) -> Any:
            if s.version != self._version:  # the codec names both versions
                raise ValueError("another protocol version")
            return convert(s)

        return checked

    def _type(self, tp: Any) -> tuple[Any, Convert]:
        """The msgspec type checking what the codec's checker of `tp` checks, and how to
        turn its value into what that checker returns."""
        wire = shape(tp)
        match wire.kind:
            case "bool":
                return bool, _same
            case "int":
                return _INT, _same
            case "float":
                return _FLOAT, _same
            case "str":  # as the codec: the upper bound only
                assert wire.size is not None
                return Annotated[str, msgspec.Meta(max_length=wire.size.high)], _same
            case "bytes":
                assert wire.size is not None
                meta = msgspec.Meta(min_length=wire.size.low, max_length=wire.size.high)
                return Annotated[bytes, meta], _same
            case "array":
                item, convert = self._type(wire.of[0])
                array = Annotated[tuple[item, ...], msgspec.Meta(max_length=MAX_ITEMS)]  # type: ignore[valid-type]
                if convert is _same:
                    return array, _same
                return array, lambda v: tuple(convert(x) for x in v)
            case "union":
                return self._union(wire.of, wire.optional)
            case _:
                return self._struct(wire.of[0], "record")

    def _union(self, classes: tuple[Any, ...], optional: bool) -> tuple[Any, Convert]:
        # one class: its kind as a required field (msgspec takes a lone tagged struct
        # without its tag); several: msgspec's tagged union, which requires the tag
        form = "record" if len(classes) == 1 else "member"
        built = [self._struct(c, form) for c in classes]
        by_struct = {struct: convert for struct, convert in built}
        members = tuple(struct for struct, _ in built) + ((type(None),) if optional else ())
        union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007

        def convert(value: Any) -> Any:
            return None if value is None else by_struct[type(value)](value)

        return union, convert


def _builder(cls: type[Any], converts: tuple[Convert, ...]) -> Convert:
    """The message of class `cls` from its mirror struct, fields converted in order."""
    names = [f.name for f in dataclasses.fields(cls)]
    get = fields_of(names)
    if all(c is _same for c in converts):  # scalars and arrays of them: as decoded
        return lambda s: cls(*get(s))
    return lambda s: cls(*[c(v) for c, v in zip(converts, get(s), strict=True)])
