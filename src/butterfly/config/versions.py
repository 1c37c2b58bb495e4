"""Hashes, numbered versions and the on-disk history of one node's configuration.

Two hashes: `config_hash` covers everything and identifies a version of this node's
config; `cluster_hash` covers only cluster-scoped options, which must be equal on every
node, so comparing it across nodes detects divergence (node-local options such as
`node.id` differ by design). Both are sha256 of canonical JSON (sorted keys, no
whitespace), so they do not depend on key order, field order or the file they came from.

History is an SQLite file in the node's data directory (stdlib sqlite3, one connection
guarded by a lock, since the file watcher thread and the node both record versions).
Versions number 1, 2, 3 locally; versions that came from a committed cluster-wide update
also keep the agreed config sequence number, which a returning node uses to catch up.
The newest version that has one is the node's position (`last_cluster_seq`); a `sync` may
move it back to the cluster's, so an old number can appear twice in one history.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from butterfly.config.fields import config_leaves, field_specs
from butterfly.config.issues import UpdateRefused
from butterfly.config.schema import ButterflyConfig, Scope
from butterfly.types.errors import ConfigError

HISTORY_FILE = Path("config") / "history.sqlite3"


def canonical_json(data: Any) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def config_hash(cfg: ButterflyConfig) -> str:
    """sha256 of the whole config as canonical JSON."""
    return hashlib.sha256(canonical_json(cfg.model_dump(mode="json"))).hexdigest()


def cluster_hash(cfg: ButterflyConfig) -> str:
    """sha256 of the cluster-scoped options only: equal on every healthy node."""
    specs = field_specs()
    leaves = config_leaves(cfg)
    shared = {k: v for k, v in leaves.items() if specs[k].scope is Scope.CLUSTER}
    return hashlib.sha256(canonical_json(shared)).hexdigest()


@dataclass(frozen=True)
class Change:
    """One option that differs between two configs (JSON values)."""

    key: str
    old: Any
    new: Any


def diff_configs(old: ButterflyConfig, new: ButterflyConfig) -> tuple[Change, ...]:
    """Changed options in schema order."""
    a, b = config_leaves(old), config_leaves(new)
    return tuple(Change(k, a[k], b[k]) for k in a if a[k] != b[k])


@dataclass(frozen=True)
class VersionRecord:
    version: int
    config_hash: str
    cluster_hash: str
    cluster_seq: int | None
    created_at: float
    source: str
    reason: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version      INTEGER PRIMARY KEY,
    config_hash  TEXT NOT NULL,
    cluster_hash TEXT NOT NULL,
    cluster_seq  INTEGER,
    created_at   REAL NOT NULL,
    source       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    config       TEXT NOT NULL
)
"""
_COLUMNS = "version, config_hash, cluster_hash, cluster_seq, created_at, source, reason"


def storable(n: int) -> bool:
    """Whether `n` fits SQLite's INTEGER (from 0): no version or seq lies outside, and
    asking for one there raised OverflowError (a traceback in the CLI, a 500 in the API)."""
    return 0 <= n < 2**63


def _drop_unique_seq(db: sqlite3.Connection) -> None:
    """Histories written before `sync` could move a node back kept cluster_seq UNIQUE;
    copy them into the current table shape once."""
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'versions'").fetchone()
    if "UNIQUE" not in sql:
        return
    db.execute(_SCHEMA.replace("versions", "versions_new", 1))
    db.execute("INSERT INTO versions_new SELECT * FROM versions")
    db.execute("DROP TABLE versions")
    db.execute("ALTER TABLE versions_new RENAME TO versions")


class ConfigHistory:
    """Every config this node has run, numbered; append-only, so rollback is a new row."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            # WAL with NORMAL sync survives a process crash and avoids an fsync per version;
            # a power cut may lose the newest version, which the node re-records on start.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.execute(_SCHEMA)
                _drop_unique_seq(self._db)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open config history {self.path}: {e}") from None

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> ConfigHistory:
        return cls(data_dir / HISTORY_FILE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ConfigHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite failures (disk full, locked, corrupt file) as one ConfigError with the path."""
        try:
            with self._lock:
                yield
        except sqlite3.Error as e:
            raise ConfigError(f"config history {self.path}: {e}") from None

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._guard():
            return self._db.execute(sql, args).fetchall()

    def record(
        self,
        cfg: ButterflyConfig,
        *,
        source: str,
        reason: str,
        cluster_seq: int | None = None,
        created_at: float | None = None,
    ) -> VersionRecord:
        """Append `cfg` as the next version and return its record."""
        data = cfg.model_dump(mode="json")
        row = (
            config_hash(cfg),
            cluster_hash(cfg),
            cluster_seq,
            time.time() if created_at is None else created_at,
            source,
            reason,
            canonical_json(data).decode(),
        )
        with self._guard(), self._db:
            cur = self._db.execute(
                "INSERT INTO versions (config_hash, cluster_hash, cluster_seq, created_at,"
                " source, reason, config) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            version = cur.lastrowid
        if version is None:
            raise ConfigError(f"config history {self.path} did not number the new version")
        return VersionRecord(version, *row[:6])

    def latest(self) -> VersionRecord | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM versions ORDER BY version DESC LIMIT 1")
        return VersionRecord(*rows[0]) if rows else None

    def get(self, version: int) -> VersionRecord:
        rows = (
            self._rows(f"SELECT {_COLUMNS} FROM versions WHERE version = ?", (version,))
            if storable(version)
            else []
        )
        if not rows:
            raise UpdateRefused(f"no config version {version} in {self.path}; see `history`")
        return VersionRecord(*rows[0])

    def versions(self, limit: int | None = None) -> list[VersionRecord]:
        """Newest first; `limit` None (or beyond what SQLite counts) for all of them."""
        sql = f"SELECT {_COLUMNS} FROM versions ORDER BY version DESC LIMIT ?"
        bound = limit if limit is not None and storable(limit) else -1
        return [VersionRecord(*r) for r in self._rows(sql, (bound,))]

    def config_at(self, version: int) -> ButterflyConfig:
        self.get(version)
        (text,) = self._rows("SELECT config FROM versions WHERE version = ?", (version,))[0]
        try:
            return ButterflyConfig.model_validate_json(text)
        except ValidationError as e:
            raise ConfigError(
                f"config version {version} in {self.path} no longer matches the schema: {e}"
            ) from None

    def by_cluster_seq(self, seq: int) -> VersionRecord | None:
        """The newest version recorded at agreed sequence number `seq`."""
        if not storable(seq):
            return None
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM versions WHERE cluster_seq = ? ORDER BY version DESC LIMIT 1",
            (seq,),
        )
        return VersionRecord(*rows[0]) if rows else None

    def latest_committed(self) -> VersionRecord | None:
        """The newest version that came from the cluster (a commit or a sync)."""
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM versions WHERE cluster_seq IS NOT NULL"
            " ORDER BY version DESC LIMIT 1"
        )
        return VersionRecord(*rows[0]) if rows else None

    def last_cluster_seq(self) -> int:
        """Agreed sequence number of the newest cluster version here; 0 before any."""
        latest = self.latest_committed()
        return 0 if latest is None or latest.cluster_seq is None else latest.cluster_seq

    def diff(self, a: int, b: int) -> tuple[Change, ...]:
        return diff_configs(self.config_at(a), self.config_at(b))
