"""`python -m butterfly.testing.config_faults [--veto N:K=V] [--fail-apply N:K=V] --config F`.

A node composed with a component that misbehaves on config changes, for the cluster tests
of cluster-wide configuration (faults by composition, never by flags inside production
types). Every node of a test cluster runs this same command; a fault applies only to the
node N it names, so one launcher command serves the whole cluster:

- `--veto N:KEY=JSON`: node N's component refuses any config where KEY has that value, so
  N votes REJECT in PREPARE and the whole change must roll back;
- `--fail-apply N:KEY=JSON`: node N's component accepts in PREPARE but fails once when the
  agreed change is applied, so N alone keeps its old config (diverged, flagged) until
  `butterfly config sync`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from butterfly.config import ButterflyConfig, load_config
from butterfly.config.fields import config_leaves
from butterfly.config.reload import Subscriber
from butterfly.node import run


def _fault(text: str) -> tuple[int, str, Any]:
    node, colon, rest = text.partition(":")
    key, sep, value = rest.partition("=")
    if not colon or not sep or not node.isdigit():
        raise argparse.ArgumentTypeError(f"expected NODE:KEY=JSON, got {text!r}")
    return int(node), key, json.loads(value)


def _accept(old: ButterflyConfig, new: ButterflyConfig) -> None:
    """The vetoing component itself applies anything it let through."""


def veto(key: str, value: Any) -> Subscriber:
    def check(old: ButterflyConfig, new: ButterflyConfig) -> None:
        if config_leaves(new)[key] == value:
            raise ValueError(f"this node's test component cannot run with {key}={value!r}")

    return check


def fail_once(key: str, value: Any) -> Subscriber:
    failed: list[bool] = []

    def on_change(old: ButterflyConfig, new: ButterflyConfig) -> None:
        if config_leaves(new)[key] == value and not failed:
            failed.append(True)
            raise RuntimeError(f"this node's test component failed to switch to {key}={value!r}")

    return on_change


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--veto", type=_fault, action="append", default=[])
    ap.add_argument("--fail-apply", type=_fault, action="append", default=[])
    args = ap.parse_args()
    cfg = load_config([args.config], env=os.environ)
    me = cfg.node.id
    subscribers: list[tuple[str, Subscriber, Subscriber | None]]
    subscribers = [(f"veto {k}", _accept, veto(k, v)) for n, k, v in args.veto if n == me]
    subscribers += [(f"apply {k}", fail_once(k, v), None) for n, k, v in args.fail_apply if n == me]
    return run(cfg, Path(cfg.model.path), subscribers=subscribers, config_files=[args.config])


if __name__ == "__main__":
    raise SystemExit(main())
