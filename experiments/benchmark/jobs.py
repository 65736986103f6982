"""Jobs: each runs in its own worker subprocess under the run's deadline; the pre-compile phase."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from experiments.benchmark.configs import BenchmarkConfig, Config, parse_search, planned_configs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Runner:
    """Runs worker subprocesses under the run's deadline (settings.deadline_s); keeps their logs."""

    def __init__(self, settings: BenchmarkConfig):
        self.settings = settings
        self.start = time.monotonic()
        self.logs: list[str] = []  # one section per worker, all written to one file

    def remaining(self) -> float:
        deadline = self.settings.deadline_s
        return deadline - (time.monotonic() - self.start) if deadline else float("inf")

    def run(self, name: str, spec: dict, *, budget: float | None = None) -> dict:
        budget = self.remaining() if budget is None else budget
        if budget < 5:
            print(f"[{time.monotonic() - self.start:6.0f} s] {name}: skipped (deadline)", flush=True)
            return {"status": "skipped", "error": "deadline reached before this job started"}
        budget = min(self.settings.job_timeout_s, budget)
        env = dict(
            os.environ,
            XLA_PYTHON_CLIENT_PREALLOCATE="false",
            XLA_PYTHON_CLIENT_MEM_FRACTION=str(self.settings.mem_fraction),
            PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
        )
        with tempfile.TemporaryDirectory() as tmp:
            result_path = os.path.join(tmp, "result.json")
            command = [
                sys.executable,
                "-m",
                "experiments.benchmark",
                "--worker=" + json.dumps(spec),
                "--worker_result=" + result_path,
            ]
            start = time.monotonic()
            # Same process group as the driver: whoever stops the driver's group stops the workers too.
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            try:
                output, _ = process.communicate(timeout=budget)
                timed_out = False
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                timed_out = True
            wall = time.monotonic() - start
            keep = 6000 if os.path.exists(result_path) and "Traceback" not in output else 20000
            self.logs.append(
                f"===== {name} (exit {process.returncode}, {time.monotonic() - start:.1f} s)\n"
                + output[-keep:]
            )
            if os.path.exists(result_path):
                with open(result_path) as f:
                    result = json.load(f)
            else:
                why = f"timed out after {budget:.0f} s" if timed_out else f"exited {process.returncode}"
                result = {"status": "failed", "error": f"worker {why} without a result: {output[-800:]}"}
        result["wall_s"] = round(wall, 2)
        print(
            f"[{time.monotonic() - self.start:6.0f} s] {name}: {result['status']} ({wall:.1f} s)"
            + (f" - {result.get('error', '')[:300]}" if result["status"] != "ok" else ""),
            flush=True,
        )
        return result


def common_spec(settings: BenchmarkConfig) -> dict:
    """What every worker of a run is told, whatever it measures: the model, its dtype and attention,
    the pruning layer, method plugins and single methods' settings, the seed, the compilation cache
    and the logits budget."""
    method_settings = {}
    if settings.method_settings:  # checked here, before any worker (the registry imports JAX: only then)
        import adaptprune_jax as prune
        from experiments.evaluation.pairs import parse_method_settings

        prune.methods.import_plugins(settings.method_modules)
        searched = settings.max_batch_configs if settings.max_batch_search else ()
        run_methods = [c.method for c in planned_configs(settings)]
        run_methods += [parse_search(text)[0].method for text in searched]
        run_methods = [m for m in dict.fromkeys(run_methods) if m != "none"]
        method_settings = parse_method_settings(settings.method_settings, run_methods)
    return dict(
        model=settings.model,
        dtype=settings.dtype,
        attention=settings.attention,
        layer=settings.layer,
        method_modules=list(settings.method_modules),
        method_settings=method_settings,
        seed=settings.seed,
        compile_cache=settings.compile_cache and os.path.abspath(settings.compile_cache),
        attention_logits_budget_mb=settings.attention_logits_budget_mb,
    )


def output_dirs(settings: BenchmarkConfig) -> list[str]:
    """Where a run's report goes: --output_dir, and $OUT/<its name> on a machine whose $OUT comes back."""
    name = os.path.basename(os.path.normpath(settings.output_dir))
    return [settings.output_dir] + ([os.path.join(os.environ["OUT"], name)] if os.environ.get("OUT") else [])


def precompile(runner: Runner, configs: list[Config], common: dict, kind: str = "jax") -> dict:
    """Fill the compilation cache from abstract shapes, in parallel processes: when there are more
    jobs than workers, the first runs alone (its autotuning results serve the shapes the later programs
    share, and parallel autotuning times kernels on a shared GPU); unpruned first, then method by
    method, so that two methods at one keep (same fixed-index prefill, same decode program) do not
    compile the same program side by side. Stops at 60% of the deadline. ``kind``: the worker that
    compiles (the stage timings' or the throughput mode's)."""
    methods = list(dict.fromkeys(["none"] + [c.method for c in configs]))
    ordered = sorted(configs, key=lambda c: methods.index(c.method))  # same-keep programs not side by side
    jobs = [
        (
            f"compile-{c.method}-k{c.keep}-b{c.batch}",
            c,
            dict(common, kind=kind, mode="compile", method=c.method, keep=c.keep, batch=c.batch),
        )
        for c in ordered
    ]
    results = {}
    deadline, workers = runner.settings.deadline_s, runner.settings.compile_workers

    def one(job):
        name, config, spec = job
        budget = runner.remaining() - 0.4 * deadline if deadline else None
        results[config] = runner.run(name, spec, budget=budget)

    if len(jobs) > workers:
        one(jobs.pop(0))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))
    return results
