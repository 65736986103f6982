"""The report: results.json, results.md, time_memory_vs_tokens.png, and the short table printed last."""

from __future__ import annotations

import json
import os
import traceback

from experiments.benchmark.floors import floor_rates
from experiments.benchmark.max_batch import predicted_max_batch

GIB = 2**30

METRICS = (
    ("vision_ms", "vision"),
    ("llm_prefill_ms", "LLM prefill"),
    ("selection_overhead_ms", "selection"),
    ("ttft_ms", "first token"),
    ("decode_ms_per_token", "decode/token"),
    ("e2e_ms", "end-to-end"),
)


def host_latency_table(rows: list[dict]) -> list[str]:
    """Single calls against back-to-back calls, and the staged first token against the runner's one
    program: how much of a stage's time is the host's (argument handling, command-buffer launch)."""
    rows = [r for r in rows if r.get("llm_prefill_pipelined_ms") or r.get("ttft_runner_ms")]
    if not rows:
        return []
    lines = [
        "",
        "## Host latency and the runner's path",
        "",
        "LLM prefill of one call vs per call of prefills issued back to back (one wait at the end: the "
        "host's work overlaps the previous call's kernels); first token through the separate stage programs "
        "vs through the runner's one program (vision, embedding and LLM prefill, as experiments.eval runs "
        "it), each with its speedup over the unpruned row of its batch.",
        "",
        "| config | LLM prefill | back to back (x floor) | first token, stages (speedup) | "
        "first token, runner (x floor, speedup) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio, speed = r.get("ratio_to_floor", {}), r.get("speedup_vs_unpruned", {})
        lines.append(
            f"| {r['label']} | {_fmt(r.get('llm_prefill_ms'))} | {_fmt(r.get('llm_prefill_pipelined_ms'))} "
            f"({_fmt(ratio.get('llm_prefill_pipelined_ms'), '.2f', 'x')}) | {_fmt(r.get('ttft_ms'))} "
            f"({_fmt(speed.get('ttft_ms'), '.2f', 'x')}) | {_fmt(r.get('ttft_runner_ms'))} "
            f"({_fmt(ratio.get('ttft_runner_ms'), '.2f', 'x')}, {_fmt(speed.get('ttft_runner_ms'), '.2f', 'x')}) |"
        )
    return lines


def _fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _gib(value):
    return None if value is None else value / GIB


def results_markdown(report: dict) -> str:
    """results.md: the tables a reader compares against the floors, PyTorch and the targets."""
    meta, ceilings = report["meta"], report["ceilings"] or {}
    lines = [
        f"# Benchmark: {meta['flags']['model']} on {ceilings.get('device_kind', '?')} ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
    ]
    if meta.get("rejudged"):
        lines += [
            f"Floors and acceptance re-judged against reference rates ({meta['rejudged']['date'][:10]}): "
            f"`{meta['rejudged']['command']}`",
            "",
        ]
    bandwidth, matmul = floor_rates(ceilings)
    lines += [
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"Ceilings measured in this run: copy {_fmt(ceilings.get('copy_bytes_per_s', 0) / 1e12, '.2f')} TB/s, "
        f"{meta['flags']['dtype']} matmul {_fmt(ceilings.get('matmul_flops_per_s', 0) / 1e12, '.3g')} "
        f"TFLOP/s. Floors use {_fmt(bandwidth / 1e12)} TB/s ({ceilings.get('floor_bytes_source', 'in-run')}) "
        f"and {_fmt(matmul / 1e12, '.3g')} TFLOP/s ({ceilings.get('floor_flops_source', 'in-run')}): "
        f"floor = max(FLOPs / matmul rate, bytes / bandwidth); decode/token floor includes the KV "
        f"read, the weight-read floor alone is in results.json.",
        "",
    ]
    jax_rows = [r for r in report["rows"] if r["framework"] == "jax" and r["status"] == "ok"]
    if jax_rows:  # a max-batch search alone has no timed rows
        lines += ["## JAX", ""] + attention_note(jax_rows, meta) + mesh_note(jax_rows)
        lines += [
            "| config | metric | ms | floor ms | x floor | speedup vs unpruned | peak GiB | JAX / PyTorch |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for row in jax_rows:
        for key, name in METRICS:
            if row.get(key) is None:
                continue
            lines.append(
                f"| {row['label']} | {name} | {row[key]:.3f} | {_fmt(row.get('floors', {}).get(key), '.3f')} | "
                f"{_fmt(row.get('ratio_to_floor', {}).get(key), '.2f')} | "
                f"{_fmt(row.get('speedup_vs_unpruned', {}).get(key), '.2f', 'x')} | "
                f"{_fmt(_gib(row.get('peak_bytes')), '.2f') if key == 'e2e_ms' else ''} | "
                f"{_fmt(row.get('jax_over_torch', {}).get(key), '.2f')} |"
            )
    if jax_rows:
        lines += [
            "",
            "| config | compile s (pre-compile / measuring process) | weights GiB per device | KV cache GiB | "
            "peak GiB | XLA temp GiB, prefill / generate |",
            "|---|---|---|---|---|---|",
        ]
        for r in jax_rows:
            pre = ((r.get("precompile") or {}).get("compile_s") or {}).values()
            pre = sum(pre) if pre else None
            temp = [
                (r["compiled_memory"].get(k) or {}).get("temp_size_in_bytes") for k in ("prefill", "generate")
            ]
            lines.append(
                f"| {r['label']} | {_fmt(pre, '.1f')} / {sum(r['compile_s'].values()):.1f} | "
                f"{_gib(r.get('weights_bytes_per_device', r['weights_bytes'])):.2f} | "
                f"{_gib(r['work']['kv_cache_bytes_allocated']):.3f} | "
                f"{_fmt(_gib(r.get('peak_bytes')))} | {_fmt(_gib(temp[0]), '.3f')} / "
                f"{_fmt(_gib(temp[1]), '.3f')} |"
            )
    lines += mesh_table(jax_rows)
    lines += host_latency_table(jax_rows)
    torch_rows = [r for r in report["rows"] if r["framework"] == "torch" and r["status"] == "ok"]
    if torch_rows:
        lines += [
            "",
            f"## PyTorch (transformers, sdpa, {meta['flags']['dtype']})",
            "",
            "`cut@K`: image tokens cut BEFORE the language model (inputs_embeds with K image tokens, no "
            "selection work: what PyTorch pruning toolkits time); decode/token is derived: (end-to-end - first token) "
            "/ (new tokens - 1).",
            "",
            "| config | vision | LLM prefill | first token | decode/token | end-to-end | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in torch_rows:
            lines.append(
                f"| {r['label']} | {_fmt(r.get('vision_ms'))} | {_fmt(r.get('llm_prefill_ms'))} | "
                f"{_fmt(r.get('ttft_ms'))} | {_fmt(r.get('decode_ms_per_token'))} | "
                f"{_fmt(r.get('e2e_ms'), '.1f')} | {_fmt(_gib(r.get('peak_bytes')))} |"
            )
    if report["max_batch"]:
        lines += [
            "",
            "## Largest batch that fits",
            "",
            "| config | largest fit | smallest failure | probes |",
            "|---|---|---|---|",
        ]
        for s in report["max_batch"]:
            probes = ", ".join(f"{p['batch']}:{'fit' if p['fits'] else p['status']}" for p in s["probes"])
            lines.append(
                f"| {s['config']} | {s['largest_fit']} | {_fmt(s['smallest_failure'], 'd')} | {probes} |"
            )
    profiled = [r for r in jax_rows if r.get("profile")]
    if profiled:
        from experiments.benchmark.profiling import main_thread

        lines += [
            "",
            "## Profile (jax.profiler, busiest device thread)",
            "",
            "busy = union of the thread's events, span = first start to last end, per prefill / per decode "
            "step; a low busy fraction means the device waited (launches, host), not the memory.",
            "",
            "| config | stage | events | busy ms | span ms | busy fraction | heaviest (share of time) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in profiled:
            for stage, summary in r["profile"].items():
                thread = main_thread(summary)
                if thread is None:
                    why = summary.get("error") or "no device events"
                    lines.append(f"| {r['label']} | {stage} | {why[:120]} | | | | |")
                    continue
                heaviest = "; ".join(
                    f"{t['name'][:48]} ({100 * t['share_of_sum']:.0f}%)" for t in thread["top"][:3]
                )
                lines.append(
                    f"| {r['label']} | {stage} | {thread['events_per_call']:.0f} | "
                    f"{thread['busy_ms_per_call']:.3f} | {thread['span_ms_per_call']:.3f} | "
                    f"{_fmt(thread['busy_fraction'], '.2f')} | {heaviest} |"
                )
    return "\n".join(lines + closing_sections(report)) + "\n"


def attention_note(jax_rows: list[dict], meta: dict) -> list[str]:
    """The attention implementation the JAX rows ran (as resolved), for a report's JAX section."""
    attention = sorted({r["attention"] for r in jax_rows if r.get("attention")})  # older runs: none
    if not attention:
        return []
    return [
        f"Attention (vision tower, LLM prefill and decoding): {', '.join(attention)} "
        f"(--attention={meta['flags'].get('attention', 'auto')}).",
        "",
    ]


def mesh_note(jax_rows: list[dict]) -> list[str]:
    """What differs on the rows that ran on a mesh ([data:D,model:M] in their label)."""
    if not any(r.get("mesh") for r in jax_rows):
        return []
    return [
        "Rows on a mesh ([data:D,model:M] in the label: models.sharding, rows over data, the language "
        "model's heads, MLP columns and vocabulary over model, the CLIP tower whole on every device): "
        "their floors are one device's share of the work at the ceilings measured on one device (FLOPs "
        "and KV-cache bytes over every device, the language model's weight reads over model, the CLIP "
        "tower's weights whole; collectives free), so a row on N devices is held to about N times the "
        "bandwidth and matmul rate; speedups vs unpruned compare rows on the same mesh; JAX / PyTorch "
        "only rows on one device (the PyTorch baseline runs on one). No peak memory (the first device "
        "held the whole model while it was laid out and split: `peak_bytes_first_device` in "
        "results.json) and no select-only timing (a one-device stage). Targets are judged only on rows "
        "on one device.",
        "",
    ]


MESH_METRICS = (
    ("vision_ms", "vision"),
    ("llm_prefill_ms", "LLM prefill"),
    ("ttft_ms", "first token"),
    ("decode_ms_per_token", "decode/token"),
    ("e2e_ms", "end-to-end"),
)


def mesh_table(jax_rows: list[dict]) -> list[str]:
    """Each configuration measured on several meshes: its stages' ms on each, and how much faster each
    later mesh is than the first one of the run (e.g. model:2 against data:1)."""
    meshes = list(dict.fromkeys(r["mesh"] for r in jax_rows if r.get("mesh")))
    if len(meshes) < 2:
        return []
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in jax_rows:
        by_config.setdefault((r["method"], r["keep"], r["batch"]), {})[r.get("mesh", "")] = r
    first, later = meshes[0], meshes[1:]
    lines = [
        "",
        f"## Meshes: each configuration on {', '.join(meshes)}",
        "",
        f"ms per stage on each mesh; speedup = ms on {first} / ms on the mesh (same configuration; the "
        "speedups over unpruned within each mesh are in the table above).",
        "",
        "| config | metric | "
        + " | ".join(f"{m} ms" for m in meshes)
        + " | "
        + " | ".join(f"speedup {m}" for m in later)
        + " |",
        "|---|---|" + "---|" * (len(meshes) + len(later)),
    ]
    for (method, keep, batch), on_mesh in by_config.items():
        if len(on_mesh) < 2:
            continue
        name = (method + (f"@{keep}" if method != "none" else "")) + f" b{batch}"
        base = on_mesh.get(first, {})
        for key, metric in MESH_METRICS:
            values = [on_mesh.get(m, {}).get(key) for m in meshes]
            if all(v is None for v in values):
                continue
            speedups = [base.get(key) / v if base.get(key) and v else None for v in values[1:]]
            lines.append(
                f"| {name} | {metric} | "
                + " | ".join(_fmt(v, ".3f") for v in values)
                + " | "
                + " | ".join(_fmt(x, ".2f", "x") for x in speedups)
                + " |"
            )
    return lines


def closing_sections(report: dict) -> list[str]:
    """A report's acceptance lines, then every row that failed or was skipped, with its error."""
    lines = ["", "## Acceptance", ""] + [f"- {c['name']}: {c['detail']}" for c in report["acceptance"]]
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed or skipped", ""] + [
            f"- {r['label']}: {r['status']}: {r.get('error', '')[:300]}" for r in failed
        ]
    return lines


def plot(report: dict, path: str) -> None:
    """Time and memory against kept image tokens, one line per method and batch (the PNG of a run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    meshes = list(dict.fromkeys(r.get("mesh", "") for r in jax_rows))
    lines = (
        (method, batch, mesh)
        for method in dict.fromkeys(r["method"] for r in jax_rows if r["method"] != "none")
        for batch in sorted({r["batch"] for r in jax_rows})
        for mesh in meshes
    )
    for method, batch, mesh in lines:  # one line per method, batch and mesh, through its unpruned row
        line = sorted(
            (
                r
                for r in jax_rows
                if r["batch"] == batch and r["method"] in (method, "none") and r.get("mesh", "") == mesh
            ),
            key=lambda r: r["keep"] or r["image_tokens"],
        )
        if not any(r["method"] == method for r in line):
            continue
        name = f"{method} b{batch}" + (f" [{mesh}]" if mesh else "")
        x = [r["keep"] or r["image_tokens"] for r in line]
        (handle,) = ax_time.plot(x, [r["ttft_ms"] for r in line], "o-", label=f"{name} first token")
        ax_time.plot(
            x,
            [r["llm_prefill_ms"] for r in line],
            "s--",
            color=handle.get_color(),
            label=f"{name} LLM prefill",
        )
        if all(r.get("peak_bytes") for r in line):
            ax_memory.plot(
                x,
                [r["peak_bytes"] / GIB for r in line],
                "o-",
                color=handle.get_color(),
                label=f"{name} peak",
            )
        ax_memory.plot(
            x,
            [r["work"]["kv_cache_bytes_allocated"] / GIB for r in line],
            ":",
            color=handle.get_color(),
            label=f"{name} KV cache",
        )
    for r in (r for r in rows if r["framework"] == "torch"):
        ax_time.plot(r["keep"] or r["image_tokens"], r["ttft_ms"], "kx")
    if any(r["framework"] == "torch" for r in rows):
        ax_time.plot([], [], "kx", label="PyTorch first token (cut before LLM)")
    ax_time.set(xlabel="kept image tokens", ylabel="ms", yscale="log", title="time (median)")
    ax_memory.set(xlabel="kept image tokens", ylabel="GiB", title="device memory (peak of one generation)")
    for ax in (ax_time, ax_memory):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{report['meta']['flags']['model']} on {(report['ceilings'] or {}).get('device_kind', '?')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _renderers(report: dict):
    """(markdown, plot, plot file name) of a report: the stage timings' or the throughput mode's."""
    if report.get("mode") == "throughput":
        from experiments.benchmark import report_throughput

        return (
            report_throughput.throughput_markdown,
            report_throughput.throughput_plot,
            report_throughput.PLOT_FILE,
        )
    return results_markdown, plot, "time_memory_vs_tokens.png"


def write_outputs(report: dict, out_dirs: list[str], *, final: bool = False, logs: list[str] = ()) -> None:
    """results.json, results.md (and with `final` the plot) in every output directory."""
    render, draw, plot_file = _renderers(report)
    for directory in out_dirs:
        os.makedirs(directory, exist_ok=True)
        if logs:
            with open(os.path.join(directory, "worker_logs.txt"), "w") as f:
                f.write("\n".join(logs))
        with open(os.path.join(directory, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        try:  # results.json is complete already; a rendering bug must not lose the run
            markdown = render(report)
        except Exception:  # noqa: BLE001
            markdown = "results.md could not be rendered:\n\n```\n" + traceback.format_exc() + "```\n"
        with open(os.path.join(directory, "results.md"), "w") as f:
            f.write(markdown)
        if final:
            try:
                draw(report, os.path.join(directory, plot_file))
            except Exception as error:  # noqa: BLE001 - e.g. no matplotlib there: --replot draws it here
                print(
                    f"no plot ({type(error).__name__}: {error}); "
                    f"run --replot={os.path.join(directory, 'results.json')}"
                )


def acceptance_tag(check: dict) -> str:
    """PASS / FAIL; n/a when not measured or not judged on this run; ???? when measured but undecided."""
    if check["pass"] is not None:
        return "PASS" if check["pass"] else "FAIL"
    measured_and_judged = check["value"] is not None and check.get("judged", True)
    return "????" if measured_and_judged else "n/a "


def summary(report: dict) -> str:
    """The short table printed last, with the acceptance lines and the seeds for a max-batch search."""
    if report.get("mode") == "throughput":
        from experiments.benchmark.report_throughput import throughput_summary

        return throughput_summary(report)
    width = max([18] + [len(r["label"]) + 1 for r in report["rows"]])
    head = (
        f"{'config':<{width}}{'vision':>8}{'prefill':>9}{'x flr':>7}{'select':>8}{'1st tok':>9}{'speedup':>8}"
        f"{'dec/tok':>9}{'x flr':>7}{'e2e':>9}{'GiB':>7}{'JAX/PT':>8}"
    )
    lines = [head] if report["rows"] else []
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<{width}}  {r['status']}: {r.get('error', '')[:90]}")
            continue
        floor, speed = r.get("ratio_to_floor", {}), r.get("speedup_vs_unpruned", {})
        lines.append(
            f"{r['label']:<{width}}{_fmt(r.get('vision_ms')):>8}{_fmt(r.get('llm_prefill_ms')):>9}"
            f"{_fmt(floor.get('llm_prefill_ms')):>7}{_fmt(r.get('selection_overhead_ms'), '.3f'):>8}"
            f"{_fmt(r.get('ttft_ms')):>9}{_fmt(speed.get('ttft_ms'), '.2f', 'x'):>8}"
            f"{_fmt(r.get('decode_ms_per_token')):>9}{_fmt(floor.get('decode_ms_per_token')):>7}"
            f"{_fmt(r.get('e2e_ms'), '.1f'):>9}{_fmt(_gib(r.get('peak_bytes'))):>7}"
            f"{_fmt(r.get('jax_over_torch', {}).get('ttft_ms')):>8}"
        )
    for s in report["max_batch"]:
        lines.append(
            f"largest batch {s['config']}: fits {s['largest_fit']}, fails {s['smallest_failure']} "
            f"(probes {', '.join(str(p['batch']) + ('+' if p['fits'] else '-') for p in s['probes'])})"
        )
    seeds = {}
    for r in report["rows"]:  # the largest measured batch of each configuration predicts its limit
        if r["framework"] == "jax" and r["status"] == "ok" and predicted_max_batch(r):
            name = r["method"] + (f":{r['keep']}" if r["keep"] else "")
            if r["batch"] >= seeds.get(name, (0, 0))[0]:
                seeds[name] = (r["batch"], predicted_max_batch(r))
    if seeds:
        lines.append(
            "predicted largest batches (seeds for a search): --max_batch_configs="
            + ",".join(f"{name}@{batch}" for name, (_, batch) in seeds.items())
        )
    return "\n".join(lines + acceptance_lines(report["acceptance"]))


def acceptance_lines(checks: list[dict]) -> list[str]:
    """One tagged line per check and the count of each verdict."""
    tags = {True: "PASS", False: "FAIL", None: "n/a "}
    lines = [f"[{acceptance_tag(c)}] {c['name']}: {c['detail']}" for c in checks]
    count = {tag: sum(c["pass"] is value for c in checks) for value, tag in tags.items()}
    lines.append(
        f"acceptance: {count['PASS']} pass, {count['FAIL']} fail, {count['n/a ']} not measured here "
        f"or inconclusive (of {len(checks)})"
    )
    return lines
