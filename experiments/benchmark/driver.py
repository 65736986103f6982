"""A benchmark run from start to end: ceilings, pre-compile, measuring jobs, max-batch search, report;
or, in a worker process, the one job it was started for."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from importlib import metadata

from experiments.benchmark.acceptance import acceptance
from experiments.benchmark.configs import (
    BenchmarkConfig,
    mesh_job_suffix,
    mesh_label,
    parse_search,
    parse_stage_compiler_options,
    planned_configs,
    planned_meshes,
    planned_runs,
)
from experiments.benchmark.floors import add_floors_and_ratios, set_floor_rates
from experiments.benchmark.jobs import Runner, common_spec, output_dirs, precompile
from experiments.benchmark.max_batch import max_batch_search
from experiments.benchmark.report import summary, write_outputs
from experiments.benchmark.throughput import run_throughput
from experiments.benchmark.timing import run_stamp
from experiments.benchmark.workers import ceilings_worker
from experiments.benchmark.workers_jax import jax_worker
from experiments.benchmark.workers_throughput import jax_throughput_worker, torch_throughput_worker
from experiments.benchmark.workers_torch import torch_worker

# The job each kind of worker process runs.
WORKERS = {
    "ceilings": ceilings_worker,
    "jax": jax_worker,
    "torch": torch_worker,
    "jax_throughput": jax_throughput_worker,
    "torch_throughput": torch_throughput_worker,
}


# The worker kinds that run PyTorch; every other kind runs JAX only.
TORCH_KINDS = ("torch", "torch_throughput")


def _without_torch() -> None:
    """A JAX worker never uses PyTorch, yet transformers imports it (about 3 s of a worker's start) for its
    configuration classes whenever it is installed. None in sys.modules makes this process an environment
    without torch, as `make eval`'s is, where transformers imports none of it and keeps what the worker
    uses (configurations, tokenizers, PIL image processors); its advisory note about that is silenced."""
    if "torch" not in sys.modules and "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        sys.modules["torch"] = None


def run_worker(spec_json: str, result_path: str) -> None:
    """Run the one job a worker process was started for; its result (or its error) goes to result_path."""
    spec = json.loads(spec_json)
    if spec["kind"] not in TORCH_KINDS:
        _without_torch()
    try:
        result = WORKERS[spec["kind"]](spec)
    except Exception as error:  # noqa: BLE001 - reported to the driver as a failed row
        text = f"{type(error).__name__}: {error}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "Out of memory"))
        result = {
            "status": "oom" if oom else "failed",
            "error": text[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        if spec.get("mode") == "probe":
            result["fits"] = False
        result.update(_platform())
    with open(result_path, "w") as f:
        json.dump(result, f)


def _precompile_refused(precompiled: dict | None) -> bool:
    """Whether a configuration's pre-compile job refused its settings (a ValueError or TypeError while
    building the program): its measuring job would refuse them alike. A timeout, a crash, running out
    of memory or a compiler error (which parallel compiles on one GPU can cause) is measured anyway."""
    return (
        bool(precompiled)
        and precompiled.get("status") == "failed"
        and "traceback" in precompiled
        and precompiled.get("error", "").startswith(("ValueError", "TypeError"))
    )


def _platform() -> dict:
    """{'platform': ...} of a failed worker that had imported JAX, so a report whose every row failed
    still says where it ran; {} otherwise."""
    jax = sys.modules.get("jax")
    try:
        return {} if jax is None else {"platform": jax.default_backend()}
    except Exception:  # noqa: BLE001 - the platform is a note on a failure, never a second one
        return {}


def _meta(settings: BenchmarkConfig) -> dict:
    """What a result needs beside its numbers to be reproduced: command, settings, versions, environment."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    own = {
        f.name: list(value) if isinstance(value := getattr(settings, f.name), tuple) else value
        for f in dataclasses.fields(settings)
        if not f.name.startswith("worker")
    }
    return {
        **run_stamp("experiments.benchmark"),
        "argv": sys.argv,
        "flags": own,
        "versions": versions,
        "python": sys.version.split()[0],
        # the workers inherit the environment: compiler flags change the numbers, so they are recorded
        "env": {
            k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
        },
    }


def run_on(report: dict) -> tuple[str, str]:
    """(model, platform) of a report, for judging the acceptance targets."""
    return report["meta"]["flags"]["model"], (report.get("ceilings") or {}).get("platform", "unknown")


def replot(settings: BenchmarkConfig) -> None:
    """Rewrite the report of settings.replot (a results.json), re-judged when reference rates are given."""
    with open(settings.replot) as f:
        report = json.load(f)
    bandwidth, matmul = settings.reference_bandwidth_tbps, settings.reference_matmul_tflops
    if (bandwidth or matmul) and report.get("mode") != "throughput":  # re-judge against references
        set_floor_rates(report["ceilings"], bandwidth, matmul)
        add_floors_and_ratios(report["rows"], report["ceilings"])
        report["acceptance"] = acceptance(report["rows"], report["max_batch"], run_on(report))
        report["meta"]["rejudged"] = run_stamp("experiments.benchmark")
    write_outputs(report, [os.path.dirname(os.path.abspath(settings.replot))], final=True)
    print(summary(report))


def run(settings: BenchmarkConfig) -> None:
    """The whole run (or, with settings.worker, one job; with settings.replot, a re-rendered report)."""
    if settings.worker:
        run_worker(settings.worker, settings.worker_result)
        return
    if settings.replot:
        replot(settings)
        return
    if settings.mode == "throughput":
        if settings.image_size:
            raise ValueError(
                "--image_size is a setting of --mode=stages; the throughput mode's images are its workload's"
            )
        run_throughput(settings, _meta(settings))
        return
    configs = planned_configs(settings)
    device_meshes = planned_meshes(settings)
    out_dirs = output_dirs(settings)
    runner = Runner(settings)
    common = dict(
        common_spec(settings),
        random_weights=settings.random_weights,
        text_tokens=settings.text_tokens,
        image_size=settings.image_size,
        new_tokens=settings.new_tokens,
        repeats=settings.repeats,
        e2e_repeats=settings.e2e_repeats,
        selection_overhead=settings.selection_overhead,
        runner_first_token=settings.runner_first_token,
        profile_dir=settings.profile_dir and os.path.abspath(settings.profile_dir),
        stage_compiler_options=parse_stage_compiler_options(settings.stage_compiler_options),
    )
    report = {"meta": _meta(settings), "ceilings": None, "rows": [], "max_batch": [], "acceptance": []}

    def save(final=False):  # after every job, so a run cut short still leaves its report
        add_floors_and_ratios(report["rows"], report["ceilings"])
        report["acceptance"] = acceptance(report["rows"], report["max_batch"], run_on(report))
        report["meta"]["wall_s"] = round(time.monotonic() - runner.start, 1)
        write_outputs(report, out_dirs, final=final, logs=runner.logs)

    report["ceilings"] = runner.run("ceilings", dict(common, kind="ceilings"))
    set_floor_rates(report["ceilings"], settings.reference_bandwidth_tbps, settings.reference_matmul_tflops)
    compiled = {}
    # (A run on meshes compiles in its measuring processes, as the throughput mode's does.)
    if settings.compile_workers > 0 and device_meshes == [""]:
        compiled = precompile(runner, configs, common)
    rows, torch_done = report["rows"], set()
    for config, mesh in planned_runs(settings):
        name = f"jax-{config.method}-k{config.keep}-b{config.batch}{mesh_job_suffix(mesh)}"
        if _precompile_refused(compiled.get(config)):  # it would be refused again: no second process
            result = {
                k: v for k, v in compiled[config].items() if k in ("status", "error", "traceback", "platform")
            }
            print(
                f"[{time.monotonic() - runner.start:6.0f} s] {name}: failed in pre-compile, not run",
                flush=True,
            )
        else:
            result = runner.run(
                name,
                dict(
                    common,
                    kind="jax",
                    mode="measure",
                    method=config.method,
                    keep=config.keep,
                    batch=config.batch,
                    mesh=mesh,
                ),
            )
        if config in compiled:
            result["precompile"] = {
                k: compiled[config].get(k) for k in ("status", "compile_s", "wall_s", "error")
            }
        rows.append(
            dict(
                result,
                framework="jax",
                method=config.method,
                keep=config.keep,
                batch=config.batch,
                label=mesh_label(config, mesh),
                new_tokens=settings.new_tokens,
                text_tokens=settings.text_tokens,
            )
        )
        torch_key = (config.keep if config.method != "none" else 0, config.batch)
        torch_batches = set(settings.torch_batch_sizes) or {config.batch}
        if settings.torch_baseline and torch_key not in torch_done and config.batch in torch_batches:
            torch_done.add(torch_key)
            keep, batch = torch_key
            method = "cut" if keep else "none"
            result = runner.run(
                f"torch-{method}-k{keep}-b{batch}", dict(common, kind="torch", keep=keep, batch=batch)
            )
            rows.append(
                dict(
                    result,
                    framework="torch",
                    method=method,
                    keep=keep,
                    batch=batch,
                    label=f"pytorch {method}{f'@{keep}' if keep else ''} b{batch}",
                    new_tokens=settings.new_tokens,
                    text_tokens=settings.text_tokens,
                )
            )
        save()
    if settings.max_batch_search:
        max_batch_search(
            runner, [parse_search(text) for text in settings.max_batch_configs], common, rows, report, save
        )
    save(final=True)
    print(summary(report), flush=True)
