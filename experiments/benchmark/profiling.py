"""Profile a jitted call and summarise where its device time goes, from JAX's own trace.

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes a Chrome-trace JSON
(`perfetto_trace.json.gz`) beside the xplane protobuf. Its device processes (`/device:GPU:0`, ...) hold
one thread per CUDA stream (kernels) and, on GPU and TPU, derived lines such as "XLA Ops" / "XLA
Modules" that repeat the same time at a coarser grain; so the summary is per thread, never summed
across them. For each device thread: events, summed duration, busy time (the union of the events'
intervals), span (first start to last end) and the heaviest names. `busy / span` is the fraction of the
window the device was working: a decode step far above its weight-read floor with a low busy fraction
is waiting on launches or the host, not on memory.

Plain Python on the JSON, so the summary is computed where the trace was taken (the GPU machine) and
only numbers travel back.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Callable

PERFETTO_FILE = "perfetto_trace.json.gz"
DEVICE_PREFIXES = ("/device:",)


def find_trace(directory: str) -> str:
    """The newest perfetto trace JSON under `directory` (jax nests it in plugins/profile/<date>/)."""
    found = glob.glob(os.path.join(directory, "**", PERFETTO_FILE), recursive=True)
    if not found:
        raise FileNotFoundError(
            f"no {PERFETTO_FILE} under {directory}: was the trace taken with create_perfetto_trace=True?"
        )
    return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
    """The trace's event list (a gzipped or plain Chrome-trace JSON: a dict with traceEvents, or a list)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path} is not a Chrome trace (traceEvents is {type(events).__name__})")
    return events


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def summarize_events(
    events: list[dict], *, calls: int = 1, top: int = 10, prefixes: tuple[str, ...] = DEVICE_PREFIXES
) -> dict:
    """Per device thread: events, sum / busy / span in ms per call (timestamps are microseconds, the
    Chrome-trace unit), busy fraction and the `top` names by summed time. `calls`: how many repetitions
    of the profiled work the trace holds (the per-call numbers divide by it). `prefixes`: whose threads
    (processes named so); ("/host:",) gives the host's threads instead, where dispatch time shows."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") != "M":
            continue
        name = (event.get("args") or {}).get("name")
        if event.get("name") == "process_name":
            processes[event.get("pid")] = name
        elif event.get("name") == "thread_name":
            threads[(event.get("pid"), event.get("tid"))] = name
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for event in events:
        if (
            event.get("ph") == "X"
            and "dur" in event
            and str(processes.get(event.get("pid"), "")).startswith(prefixes)
        ):
            by_thread[(event["pid"], event.get("tid"))].append(event)
    summary = {"calls": calls, "device_threads": []}
    for (pid, tid), thread_events in sorted(by_thread.items(), key=lambda item: str(item[0])):
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in thread_events]
        span = max(end for _, end in intervals) - min(start for start, _ in intervals)
        busy = union_length(intervals)
        per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for event in thread_events:
            count_and_time = per_name[event.get("name", "?")]
            count_and_time[0] += 1
            count_and_time[1] += float(event["dur"])
        heaviest = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
        summed = sum(float(e["dur"]) for e in thread_events)
        summary["device_threads"].append(
            {
                "process": processes.get(pid),
                "thread": threads.get((pid, tid), str(tid)),
                "events_per_call": len(thread_events) / calls,
                "sum_ms_per_call": summed / 1e3 / calls,
                "busy_ms_per_call": busy / 1e3 / calls,
                "span_ms_per_call": span / 1e3 / calls,
                "busy_fraction": busy / span if span > 0 else None,
                "top": [
                    {
                        "name": name,
                        "count_per_call": count / calls,
                        "ms_per_call": total / 1e3 / calls,
                        "share_of_sum": total / max(summed, 1e-12),
                    }
                    for name, (count, total) in heaviest
                ],
            }
        )
    return summary


def profile_call(
    fn: Callable[[], object],
    directory: str,
    *,
    calls: int = 1,
    units_per_call: int = 1,
    sync: Callable | None = None,
    top: int = 10,
) -> dict:
    """Run `fn` `calls` times (each followed by `sync`) under a JAX trace in `directory` and summarise
    the device threads per unit of work (`units_per_call` units per call: e.g. the decode steps of one
    generate call); the trace files stay in `directory`. Warm `fn` up first: a compile inside the
    window would be profiled too."""
    import jax

    sync = sync or jax.block_until_ready
    os.makedirs(directory, exist_ok=True)
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(calls):
            sync(fn())
    path = find_trace(directory)
    summary = summarize_events(load_events(path), calls=calls * units_per_call, top=top)
    summary["trace"] = path
    return summary


def main_thread(summary: dict) -> dict | None:
    """The device thread that did the most work (on GPU: the compute stream's kernels)."""
    threads = summary.get("device_threads") or []
    return max(threads, key=lambda t: t["busy_ms_per_call"]) if threads else None


def kernel_sequence(events: list[dict], *, calls: int = 1) -> list[dict]:
    """The busiest kernel stream's events (a device thread named 'Stream ...', not a derived line
    such as 'XLA Ops'; any device thread if none is) of the last of `calls` equal repetitions, in
    time order: name, microseconds, start and end relative to that call's first event."""
    device_pids = {
        e.get("pid")
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str((e.get("args") or {}).get("name", "")).startswith(DEVICE_PREFIXES)
    }
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "dur" in event and event.get("pid") in device_pids:
            by_thread[(event["pid"], event.get("tid"))].append(event)
    if not by_thread:
        return []
    names = {
        (e.get("pid"), e.get("tid")): (e.get("args") or {}).get("name", "")
        for e in events
        if e.get("ph") == "M"
    }
    streams = {
        key: thread for key, thread in by_thread.items() if str(names.get(key, "")).startswith("Stream")
    }
    busiest = max(
        (streams or by_thread).values(),
        key=lambda thread: union_length([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in thread]),
    )
    ordered = sorted(busiest, key=lambda e: float(e["ts"]))
    last = ordered[len(ordered) - len(ordered) // calls :]
    start = float(last[0]["ts"]) if last else 0.0
    return [
        {
            "name": e.get("name", "?"),
            "us": float(e["dur"]),
            "start_us": float(e["ts"]) - start,
            "end_us": float(e["ts"]) + float(e["dur"]) - start,
        }
        for e in last
    ]
