"""TOML output: the annotated template generated from the schema, and plain dumps.

The template is the documentation of every option (description, default, range,
mutability, scope; for an option this build accepts only at its default, that and why),
generated from the same models the loader validates against, so the docs cannot drift
from the code; loading it back yields the default config. `dump_toml`
writes any config (for `config show`) in a form `load_config` reads back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from butterfly.config.fields import FieldSpec, field_specs, unflatten
from butterfly.config.schema import ButterflyConfig, Mutability
from butterfly.config.validate import UNSUPPORTED

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_MEANING = {
    Mutability.STATIC_CRITICAL: "static-critical: restart required, equal on every node",
    Mutability.STATIC_LOCAL: "static-local: restart required",
    Mutability.DYNAMIC_CONSENSUS: "dynamic-consensus: changed at runtime by cluster agreement",
    Mutability.DYNAMIC_LOCAL: "dynamic-local: changed at runtime, applies at once",
}
HEADER = """\
# Butterfly configuration: every option, generated from butterfly.config.schema
# (`butterfly config template`), so it cannot drift from what the loader accepts.
#
# Precedence: defaults < files (this one after its `include = [...]`, paths relative
# to the including file) < environment BUTTERFLY_<SECTION>__<KEY> (nested tables join
# with "__", e.g. BUTTERFLY_SECURITY__TLS__ENABLED) < command-line --set KEY=VALUE.
# Mutability: static-* options need a restart; dynamic-consensus ones are changed for
# the whole cluster through agreement; dynamic-local ones apply on this node at once.
# Scope: "cluster" options must be equal on every node, "node" ones are this node's.
# Relative paths in a file are relative to that file.

# include = ["common.toml"]
"""


def _escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else _escape(key)


def _tables(data: Mapping[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(table path, its direct leaves) with leaves before subtables, as TOML requires."""
    leaves = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    yield path, leaves
    for k, v in data.items():
        if isinstance(v, Mapping):
            yield from _tables(v, f"{path}.{toml_key(k)}".lstrip("."))


def dump_toml(data: Mapping[str, Any]) -> str:
    """Nested dict of TOML-able values as a TOML document."""
    chunks = []
    for path, leaves in _tables(data, ""):
        lines = [f"[{path}]"] if path else []
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in leaves.items()]
        if lines:
            chunks.append("\n".join(lines))
    return "\n\n".join(chunks) + "\n"


def _number(x: float, kind: str) -> str:
    return str(int(x)) if kind == "int" else repr(x)


def describe(spec: FieldSpec) -> list[str]:
    """The comment lines documenting one option. One that this build accepts only at its
    default (`validate.UNSUPPORTED`) says so and why, with no range or mutability: the
    template offered it as a live setting, and any other value stops the node at start."""
    if (why := UNSUPPORTED.get(spec.key)) is not None:
        only = f"default {toml_value(spec.default)}; only the default is accepted"
        return [f"# {spec.description}", f"# {only}", f"# not supported: {why}"]
    facts = [f"default {toml_value(spec.default)}"]
    if spec.ge is not None or spec.le is not None:
        lo = "" if spec.ge is None else _number(spec.ge, spec.kind)
        hi = "" if spec.le is None else _number(spec.le, spec.kind)
        facts.append(f"range {lo}..{hi}")
    if spec.choices:
        facts.append("one of " + " | ".join(spec.choices))
    facts.append(f"scope {spec.scope.value}")
    return [f"# {spec.description}", f"# {'; '.join(facts)}", f"# {_MEANING[spec.mutability]}"]


def _descriptions(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[prefix + name] = info.description or ""
            out.update(_descriptions(ann, f"{prefix}{name}."))
    return out


def template() -> str:
    """The annotated TOML template of every option at its default."""
    specs = field_specs()
    about = _descriptions(ButterflyConfig)
    chunks = [HEADER]
    for path, leaves in _tables(unflatten({k: s.default for k, s in specs.items()}), ""):
        if not path:
            continue
        lines = [f"# {about[path]}", f"[{path}]"] if path in about else [f"[{path}]"]
        for name, value in leaves.items():
            lines += ["", *describe(specs[f"{path}.{name}"]), f"{name} = {toml_value(value)}"]
        chunks.append("\n".join(lines))
    return "\n\n".join(chunks) + "\n"
