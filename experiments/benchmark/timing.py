"""Timing and run-stamping shared by the experiment scripts (no flags here: any script may import it)."""

from __future__ import annotations

import datetime
import shlex
import statistics
import sys
import time


def median(samples):
    return statistics.median(samples) if samples else None


def timed(fn, repeats: int, sync) -> list[float]:
    """Milliseconds of `repeats` calls after one warm-up call; `sync(out)` waits for the device."""
    if repeats <= 0:
        return []
    sync(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def back_to_back(fn, calls: int, sync) -> float:
    """Milliseconds per call of ``calls`` calls issued without waiting, then one ``sync`` of them all:
    each call's host work overlaps the previous calls' device work."""
    start = time.perf_counter()
    sync([fn() for _ in range(calls)])
    return (time.perf_counter() - start) * 1e3 / calls


def run_stamp(module: str) -> dict:
    """When (UTC, seconds) and by which command line (`python -m <module> <args>`) a result was made."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m {module} " + shlex.join(sys.argv[1:]),
    }
