"""Building Butterfly's C library (runtime/native.py's kernels) for the CPU that runs it,
and what decides between its builds.

Built with the system C compiler (`cc`, or `$CC`) at `-O3 -march=native` into a cache
directory keyed by the source, the flags and the CPU's flags, so a machine that changes
CPU builds again. It is linked against torch's own OpenMP runtime, so its loops use the
calling thread's torch thread count and torch's thread team: a second runtime would start
threads of its own that compete with torch's on the same cores. It is built once per way
of fetching the weight ahead of the stream (`STREAMS`); runtime/native.py times the
builds and keeps one (`choose_stream`), recording a clear timing beside them
(`decisive`, `remember`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# blocked_linear.c: the product; llama_layers.c: a llama stage's layers over a few rows
# on the same blocks (runtime/fused_layers.py). One library, built and checked as one.
SOURCES = tuple(Path(__file__).with_name(n) for n in ("blocked_linear.c", "llama_layers.c"))
HEADERS = (Path(__file__).with_name("vectors.h"),)  # included by both: part of the cache key

COMPILE_FLAGS = ("-O3", "-march=native", "-fPIC", "-fopenmp", "-std=c11", "-ffp-contract=fast")
COMPILE_TIMEOUT_S = 120

STREAMS: dict[str, tuple[str, ...]] = {
    "nta": ("-DBUTTERFLY_HINT=0", "-DBUTTERFLY_AHEAD=2048"),
    "t2": ("-DBUTTERFLY_HINT=1", "-DBUTTERFLY_AHEAD=4096"),
}
"""How the kernels fetch the weight ahead of their stream, one build each: prefetchnta
2 KiB ahead, or prefetcht2 4 KiB ahead (blocked_linear.c says what each won where)."""
CACHE_SPARING = "nta"
"""Kept unless another build streams `STREAM_MARGIN` times faster: in one process it
streamed as fast as without the hint on the AMD EPYC, yet four node processes sharing two
cores ran 0.90-0.93x the time per token with it, the weights no longer flushing the
caches the nodes' Python runs on. A one-process timing cannot see that gain."""
STREAM_MARGIN = 1.15
TIE, CLEAR = 1.05, 1.3  # timings kept for later processes (`decisive`): the Xeon's is 1.8


@dataclass(frozen=True)
class StreamChoice:
    """The build this process uses, and each build's fp32 stream rate (GB/s; empty where
    only one was built): timed at this load, or `remembered` from an earlier one."""

    name: str
    gbs: dict[str, float]
    remembered: bool


def choose_stream(gbs: Mapping[str, float]) -> str:
    """The build to keep, from each build's measured stream rate: the fastest, unless
    the cache-sparing one is within `STREAM_MARGIN` of it."""
    best = max(gbs, key=lambda name: gbs[name])
    spare = gbs.get(CACHE_SPARING)
    if spare is not None and gbs[best] < STREAM_MARGIN * spare:
        return CACHE_SPARING
    return best


def decisive(gbs: Mapping[str, float]) -> bool:
    """Whether a timing is clear enough to keep for later processes: the cache-sparing
    build at least about as fast as the best (within `TIE`), or the best clearly past
    the margin (`CLEAR`). A timing near the margin, which another process's load or the
    hour can tip, decides for this process only, and the next one times again."""
    spare = gbs.get(CACHE_SPARING)
    if spare is None:
        return True
    best = max(gbs.values())
    return best <= TIE * spare or best >= CLEAR * spare


def remembered(record: Path, names: set[str]) -> dict[str, float] | None:
    """The rates timed for these builds by an earlier process, None if none are on record
    (or the record is not one). Why remembered: the timing fills and streams twice the
    L3's bytes (up to 128 MiB), 0.35 s at every node's start on the Intel Xeon, and which
    prefetch streams faster is a property of the CPU the builds are keyed by, not of the
    hour; only a clear timing is kept (`decisive`). Delete the record (beside the
    builds) to time again."""
    try:
        gbs = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(gbs, dict) or set(gbs) != names:
        return None
    if not all(isinstance(v, float) and v > 0 for v in gbs.values()):
        return None
    return gbs


def remember(record: Path, gbs: dict[str, float]) -> None:
    """Written whole and renamed into place, as the builds are."""
    try:
        fd, tmp = tempfile.mkstemp(dir=record.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(gbs, f)
        os.replace(tmp, record)
    except OSError as e:
        log.info("the stream timing is not remembered: %s", e)


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def cache_dir() -> Path:
    """Where the library is built and loaded from: a directory of this user's that no one
    else may write to, since whatever library lies there is loaded into the node."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    shared = Path(tempfile.gettempdir()) / f"butterfly-kernels-{os.getuid()}"
    for path in (base / "butterfly" / "kernels", shared):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if private(path):
                return path
        except OSError:
            continue
    raise RuntimeError("no private writable directory to build the blocked kernel in")


def private(path: Path) -> bool:
    """Owned by this user and writable by no one else."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(path, os.W_OK)


def build(stream: tuple[str, ...] = STREAMS[CACHE_SPARING]) -> Path:
    """The library's path built with `stream`'s flags, compiling it first if this source,
    these flags and this CPU have no build yet. Concurrent builders (node processes
    starting together) each write a file of their own and rename it into place, so none
    reads a half-written one."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or $CC) on PATH")
    torch_lib = Path(torch.__file__).parent / "lib"
    link = ["-fopenmp", "-lm"]
    if (torch_lib / "libgomp.so.1").exists():  # torch's own OpenMP runtime
        link = [f"-L{torch_lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{torch_lib}", "-lm"]
    sources = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    flags = COMPILE_FLAGS + stream
    key = hashlib.sha256(
        b"\0".join([*sources, " ".join(flags + tuple(link)).encode(), compiler.encode()])
        + cpu_flags().encode()
    ).hexdigest()[:20]
    cache = cache_dir()
    target = cache / f"blocked_linear-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    objs = [f"{tmp}.{i}.o" for i in range(len(SOURCES))]
    compile_cmds = [
        [compiler, *flags, "-c", str(source), "-o", obj]
        for source, obj in zip(SOURCES, objs, strict=True)
    ]
    try:
        for cmd in [*compile_cmds, [compiler, "-shared", *objs, "-o", tmp, *link]]:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)
        log.info("built the blocked kernels at %s", target)
        return target
    finally:
        for leftover in (tmp, *objs):
            if os.path.exists(leftover):
                os.unlink(leftover)
