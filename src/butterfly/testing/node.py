"""`python -m butterfly.testing.node --config F --behaviour B`: one node, maybe a liar."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from butterfly.agreement.driver import AgreementDriver
from butterfly.config import load_config
from butterfly.node import run
from butterfly.testing.liar_votes import DRIVERS
from butterfly.testing.liars import BEHAVIOURS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--behaviour", default="honest", choices=sorted(BEHAVIOURS))
    args = ap.parse_args()
    cfg = load_config([args.config], env=os.environ)
    return run(
        cfg,
        Path(cfg.model.path),
        stage_server_type=BEHAVIOURS[args.behaviour],
        agreement_type=DRIVERS.get(args.behaviour, AgreementDriver),
    )


if __name__ == "__main__":
    raise SystemExit(main())
