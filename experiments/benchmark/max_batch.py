"""The largest batch that fits: a search per configuration, each probe one process running a generation."""

from __future__ import annotations

import concurrent.futures

from experiments.benchmark.acceptance import on_one_device
from experiments.benchmark.configs import BenchmarkConfig, Config
from experiments.benchmark.jobs import Runner


def predicted_max_batch(row: dict) -> int | None:
    """Where a line through (0, weights) and this row's measured peak meets the allocator limit."""
    if not (row.get("peak_bytes") and row.get("bytes_limit") and row.get("weights_bytes")):
        return None
    per_row = (row["peak_bytes"] - row["weights_bytes"]) / row["batch"]
    batch = int((row["bytes_limit"] - row["weights_bytes"]) / per_row)
    return batch // 8 * 8 if batch >= 16 else batch


class BatchSearch:
    """Largest batch that fits for one configuration: growth (x --max_batch_growth, doubling by default)
    until a probe fails, then bisection (shrinking by the same factor while nothing is known to fit).

    Start: the one given (none@START), else the prediction of this configuration's largest measured
    row (`predicted_max_batch`), else twice the largest known fit. Measured rows on one device count as
    known fits (the probes run on one); a probe that fails (OOM or otherwise) does not fit.
    """

    def __init__(self, config: Config, rows: list[dict], start: int | None, settings: BenchmarkConfig):
        self.config, self.probes, self.smallest_failure = config, [], None
        self.growth, self.max_probes = settings.max_batch_growth, settings.max_batch_probes
        self.cap, self.tolerance = settings.max_batch_cap, settings.max_batch_tolerance
        measured = [
            r
            for r in rows
            if r["framework"] == "jax"
            and r["method"] == config.method
            and r["keep"] == config.keep
            and r["status"] == "ok"
            and on_one_device(r)
        ]
        self.largest_fit = max((r["batch"] for r in measured), default=0)
        if not start and measured:
            start = predicted_max_batch(max(measured, key=lambda r: r["batch"]))
        self.start = start if start and start > self.largest_fit else max(2 * self.largest_fit, 1)
        self.next = min(self.start, self.cap)

    def pending(self) -> int | None:
        """The next batch to probe, or None when done (converged, capped, or out of probes)."""
        lo, hi = self.largest_fit, self.smallest_failure
        if len(self.probes) >= self.max_probes or self.next in (None, lo, hi) or self.next < 1:
            return None
        if hi is None and lo >= self.cap:
            return None
        if hi is not None and hi - lo <= max(1, self.tolerance * lo):
            return None
        return self.next

    def record(self, batch: int, result: dict) -> None:
        fits = bool(result.get("fits"))
        self.probes.append(
            {
                "batch": batch,
                "fits": fits,
                "status": result["status"],
                "peak_bytes": result.get("peak_bytes"),
                "error": result.get("error", "")[:300],
                "wall_s": result.get("wall_s"),
            }
        )
        if fits:
            self.largest_fit = batch
        else:
            self.smallest_failure = batch
        lo, hi, growth = self.largest_fit, self.smallest_failure, self.growth
        if hi is None:
            self.next = min(max(batch + 1, int(batch * growth)), self.cap)
        else:
            self.next = (lo + hi) // 2 if lo else min(batch - 1, int(batch / growth))

    def summary(self) -> dict:
        return {
            "config": self.config.name,
            "method": self.config.method,
            "keep": self.config.keep,
            "largest_fit": self.largest_fit,
            "smallest_failure": self.smallest_failure,
            "start": self.start,
            "probes": self.probes,
        }


def max_batch_search(
    runner: Runner,
    configs: list[tuple[Config, int | None]],
    common: dict,
    rows: list[dict],
    report: dict,
    save,
) -> None:
    """All searches in lockstep: each round compiles every search's next probe in parallel processes
    (compile-only; whether it fits is decided by running it), then runs the probes one at a time."""
    searches = [BatchSearch(config, rows, start, runner.settings) for config, start in configs]
    workers = runner.settings.compile_workers
    report["max_batch"] = [s.summary() for s in searches]

    def spec(search, batch, mode):
        return dict(
            common,
            kind="jax",
            mode=mode,
            method=search.config.method,
            keep=search.config.keep,
            batch=batch,
            repeats=0,
            e2e_repeats=0,
            selection_overhead=False,
        )

    while True:
        round_ = [(search, search.pending()) for search in searches if search.pending() is not None]
        if not round_ or runner.remaining() < 5:
            break
        if workers > 0 and len(round_) > 1:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(
                    pool.map(
                        lambda item: runner.run(
                            f"compile-probe-{item[0].config.method}-k{item[0].config.keep}-b{item[1]}",
                            spec(item[0], item[1], "compile"),
                        ),
                        round_,
                    )
                )
        for search, batch in round_:
            result = runner.run(
                f"probe-{search.config.method}-k{search.config.keep}-b{batch}", spec(search, batch, "probe")
            )
            if result["status"] == "skipped":
                return
            search.record(batch, result)
            report["max_batch"] = [s.summary() for s in searches]
            save()
