"""The throughput mode's report: results.md's table, the plot and the short table printed last."""

from __future__ import annotations

from experiments.benchmark.acceptance import TORCH_REFERENCE_BATCH
from experiments.benchmark.report import GIB, _fmt, acceptance_lines, attention_note, closing_sections

PLOT_FILE = "questions_per_second.png"


def _stages(row) -> str:
    stages = row.get("stage_ms_per_question") or {}
    return " / ".join(_fmt(stages.get(k)) for k in ("preprocess", "generate", "detokenize", "other"))


def _counts(row) -> str:
    """'4 x 640' for 640 answers of 4 tokens each."""
    return ", ".join(f"{n} x {c}" for n, c in (row.get("answer_token_counts") or {}).items()) or "-"


def _method(row) -> str:
    return row["method"] + (f"@{row['keep']}" if row["method"] != "none" else "")


def throughput_markdown(report: dict) -> str:
    """results.md of a throughput run."""
    meta, work = report["meta"], report["workload"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    device = next((r["device_kind"] for r in ok if r["framework"] == "jax"), None)
    flags = meta["flags"]
    jax_rows = [r for r in ok if r["framework"] == "jax"]
    prompt = jax_rows[0]["prompt_tokens"] if jax_rows else None
    lines = [
        f"# Throughput: {flags['model']} on {device or '?'} ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. Random weights, "
        f"{flags['dtype']}; each configuration in its own process.",
        "",
        "What is timed: the answer path of an evaluation, per batch, after a warm-up batch (JAX: the "
        "batch that compiles, and one more per further prompt-length bucket): JAX `LlavaEngine.answer` "
        "(tokenize, LLaVA-1.5's pad-to-square image preprocessing through transformers' image "
        "processor, the jitted prefill with the method and decode loop, decode to text); transformers "
        "`LlavaProcessor` (same image processor and tokenizer, left padding) + "
        "`LlavaForConditionalGeneration.generate` (sdpa, greedy) + `batch_decode`. "
        f"Every answer is exactly {work['answer_tokens']} tokens (JAX without a stop at EOS, "
        "transformers with min_new_tokens = max_new_tokens): random weights emit EOS by chance, so a "
        "fixed count stands in for a short answer and its EOS.",
        "",
        f"Work: {work['distinct_questions']} POPE-form questions, {work['questions_per_image']} per image, "
        f"cycled through the batches; {work['images']} images ({work['image_source']}; "
        f"{', '.join(work['image_sizes'])}), held decoded in memory (the eval harness decodes image "
        "files in a background thread while the model runs). Prompt tokens"
        + (f" {prompt['min']}-{prompt['max']} (mean {prompt['mean']})" if prompt else "")
        + ", image tokens included, with a word-level tokenizer over the prompts' words (no LLaMA "
        "tokenizer can be fetched; LLaMA's splits the same prompt into somewhat more tokens). Example:",
        "",
        "```",
        work["example_prompt"],
        "```",
        "",
        f"questions/s = timed questions / timed seconds; speedups compare questions/s with transformers "
        f"at batch {TORCH_REFERENCE_BATCH} and with unpruned JAX at the same batch. Stages: mean ms per "
        "question in preprocessing (tokenize, images, padding), generation (host-to-device copies "
        "included), decoding to text, and the rest.",
        "",
        *_overlap_note(jax_rows),
        *attention_note(jax_rows, meta),
        *_batch_note(jax_rows, flags),
        f"| framework | method | batch | devices | questions/s | questions/s per device | ms/question | "
        f"vs transformers b{TORCH_REFERENCE_BATCH} "
        "| vs JAX unpruned, same batch and devices | preprocess / generate / detokenize / other ms per "
        "question | median-batch questions/s | timed questions | answer tokens x answers | first batch s | "
        "peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        devices = r.get("devices", 1)
        where = f"{devices} ({r['mesh']})" if r.get("mesh") else str(devices)
        lines.append(
            f"| {'JAX' if r['framework'] == 'jax' else 'transformers'} | {_method(r)} | {r['batch']} | "
            f"{where} | "
            f"{r['questions_per_s']:.2f} | {r['questions_per_s'] / devices:.2f} | {r['ms_per_question']:.2f} | "
            f"{_fmt(r.get('speedup_vs_transformers'), '.2f', 'x')} | "
            f"{_fmt(r.get('speedup_vs_unpruned'), '.2f', 'x')} | {_stages(r)} | "
            f"{r['questions_per_s_median_batch']:.2f} | {r['timed_questions']} | {_counts(r)} | "
            f"{_fmt(r.get('first_batch_s'), '.1f')} | "
            f"{_fmt(None if r.get('peak_bytes') is None else r['peak_bytes'] / GIB)} |"
        )
    examples = next((r["example_answers"] for r in ok if r.get("example_answers")), None)
    if examples:
        lines += ["", f"Example answers (random weights): {examples}"]
    return "\n".join(lines + closing_sections(report)) + "\n"


def _batch_note(jax_rows: list[dict], flags: dict) -> list[str]:
    """What a row's batch is when rows ran on meshes: the whole batch, its rows split over data."""
    if not any(r.get("mesh") for r in jax_rows):
        return []
    how = (
        "--batch_per_device: each configuration's batch per device of the data axis, so the whole batch "
        "grows with it"
        if flags.get("batch_per_device")
        else "the same whole batch on every mesh"
    )
    return [
        f"batch = a row's whole batch, its rows split over its mesh's data axis ({how}); speedups vs "
        "unpruned JAX compare rows on the same mesh; only rows on one device are judged.",
        "",
    ]


def _overlap_note(jax_rows: list[dict]) -> list[str]:
    """How the JAX rows ran their batches: streamed (the next batch prepared while one generates) or
    one after another."""
    streamed = sorted({bool(r.get("overlap_preprocessing")) for r in jax_rows})
    if not streamed:
        return []
    if streamed == [True]:
        how = (
            "The JAX rows prepare the next batch (tokenize, images, padding) on a background thread "
            "while one generates (`LlavaEngine.answer_stream`, as the eval harness runs): preprocessing "
            "hides behind generation, so the stage times may add up to more than the wall time."
        )
    elif streamed == [False]:
        how = "The JAX rows run their batches one after another (--nooverlap_preprocessing)."
    else:
        how = "JAX rows differ in --overlap_preprocessing (see each row's results.json)."
    return [how, ""]


def throughput_summary(report: dict) -> str:
    """The short table printed at the end of a throughput run, with the acceptance lines."""
    lines = [
        f"{'config':<24}{'q/s':>9}{'ms/q':>9}{'vs PT b1':>10}{'vs none':>9}"
        f"{'prep ms/q':>11}{'gen ms/q':>10}{'detok ms/q':>11}"
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<24}  {r['status']}: {r.get('error', '')[:90]}")
            continue
        stages = r["stage_ms_per_question"]
        lines.append(
            f"{r['label']:<24}{r['questions_per_s']:>9.2f}{r['ms_per_question']:>9.2f}"
            f"{_fmt(r.get('speedup_vs_transformers'), '.2f', 'x'):>10}"
            f"{_fmt(r.get('speedup_vs_unpruned'), '.2f', 'x'):>9}"
            f"{stages['preprocess']:>11.2f}{stages['generate']:>10.2f}{stages['detokenize']:>11.3f}"
        )
    return "\n".join(lines + acceptance_lines(report["acceptance"]))


def throughput_plot(report: dict, path: str) -> None:
    """Questions per second against the batch, a line per JAX method, transformers as crosses."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(_method(r) for r in ok if r["framework"] == "jax"):
        line = sorted(
            (r for r in ok if r["framework"] == "jax" and _method(r) == method), key=lambda r: r["batch"]
        )
        ax.plot([r["batch"] for r in line], [r["questions_per_s"] for r in line], "o-", label=f"JAX {method}")
    torch_rows = sorted((r for r in ok if r["framework"] == "torch"), key=lambda r: r["batch"])
    if torch_rows:
        ax.plot(
            [r["batch"] for r in torch_rows],
            [r["questions_per_s"] for r in torch_rows],
            "kx--",
            label="transformers (unpruned)",
        )
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="questions / s", title="answer path throughput")
    ax.set_xticks(sorted({r["batch"] for r in ok}) or [1])
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    device = next((r["device_kind"] for r in ok), "?")
    fig.suptitle(f"{report['meta']['flags']['model']} on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
