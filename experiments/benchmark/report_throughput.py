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


def _image_tokens(row) -> str:
    """'2667 / 2928': the mean and the most image tokens per question the row answered."""
    tokens = row.get("image_tokens")
    return f"{tokens['mean']:g} / {tokens['max']}" if isinstance(tokens, dict) else "-"


def _what_is_timed(work: dict) -> str:
    """The answer path of each framework, in the model's kind (LLaVA-1.5 or LLaVA-NeXT)."""
    if work.get("anyres"):
        images = (
            "LLaVA-NeXT's anyres preprocessing through transformers' image processor (each image at its "
            "own aspect ratio: the base crop and the high-resolution crops of its best pinpoint, so the "
            "rows of a batch carry different image-token counts, padded to the batch's most)"
        )
        processor, model = "LlavaNextProcessor", "LlavaNextForConditionalGeneration"
    else:
        images = "LLaVA-1.5's pad-to-square image preprocessing through transformers' image processor"
        processor, model = "LlavaProcessor", "LlavaForConditionalGeneration"
    return (
        "What is timed: the answer path of an evaluation, per batch, after a warm-up batch (JAX: the "
        "batch that compiles, and one more per further prefill program: prompt-length bucket, and on "
        f"LLaVA-NeXT image-slot count): JAX `LlavaEngine.answer` (tokenize, {images}, the jitted "
        f"prefill with the method and decode loop, decode to text); transformers `{processor}` (same "
        f"image processor and tokenizer, left padding) + `{model}.generate` (sdpa, greedy) + "
        f"`batch_decode`. Every answer is exactly {work['answer_tokens']} tokens (JAX without a stop at "
        "EOS, transformers with min_new_tokens = max_new_tokens): random weights emit EOS by chance, so "
        "a fixed count stands in for a short answer and its EOS."
    )


def _work_line(work: dict, prompt: dict | None) -> str:
    """The questions, images, image tokens and prompt tokens every row answered."""
    image_tokens = work.get("image_tokens") or {}
    if work.get("anyres"):
        per_image = ", ".join(f"{size}: {count}" for size, count in image_tokens.items())
        images = f"image tokens by image size (LLaVA-NeXT, newlines included): {per_image}"
    else:
        images = f"{next(iter(image_tokens.values()), '?')} image tokens per image"
    if work.get("preset", True):
        tokenizer = (
            "a word-level tokenizer over the prompts' words (no LLaMA tokenizer can be fetched; LLaMA's "
            "splits the same prompt into somewhat more tokens)"
        )
    else:
        tokenizer = "the checkpoint's tokenizer and image processor"
    return (
        f"Work: {work['distinct_questions']} POPE-form questions, {work['questions_per_image']} per image, "
        f"cycled through the batches; {work['images']} images ({work['image_source']}; "
        f"{', '.join(work['image_sizes'])}), held decoded in memory (the eval harness decodes image "
        f"files in a background thread while the model runs); {images}. Prompt tokens"
        + (f" {prompt['min']}-{prompt['max']} (mean {prompt['mean']})" if prompt else "")
        + f", image tokens included, with {tokenizer}. Example:"
    )


def throughput_markdown(report: dict) -> str:
    """results.md of a throughput run."""
    meta, work = report["meta"], report["workload"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    device = next((r["device_kind"] for r in ok if r["framework"] == "jax"), None)
    flags = meta["flags"]
    jax_rows = [r for r in ok if r["framework"] == "jax"]
    prompt = jax_rows[0]["prompt_tokens"] if jax_rows else None
    weights = "Random weights" if work.get("random_weights", True) else "The checkpoint's weights"
    lines = [
        f"# Throughput: {flags['model']} on {device or '?'} ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. {weights}, "
        f"{flags['dtype']}; each configuration in its own process.",
        "",
        _what_is_timed(work),
        "",
        _work_line(work, prompt),
        "",
        "```",
        work["example_prompt"],
        "```",
        "",
        f"questions/s = timed questions / timed seconds; speedups compare questions/s with transformers "
        f"at batch {TORCH_REFERENCE_BATCH} and with unpruned JAX at the same batch. Stages: mean ms per "
        "question in preprocessing (tokenize, images, padding), generation (host-to-device copies "
        "included), decoding to text, and the rest. Image tokens: per timed question, as each framework "
        "put them in its prompts (a pruned row's LLM keeps its keep of them).",
        "",
        *_overlap_note(jax_rows),
        *attention_note(jax_rows, meta),
        *_batch_note(jax_rows, flags),
        f"| framework | method | batch | devices | questions/s | questions/s per device | ms/question | "
        f"vs transformers b{TORCH_REFERENCE_BATCH} "
        "| vs JAX unpruned, same batch and devices | preprocess / generate / detokenize / other ms per "
        "question | median-batch questions/s | timed questions | image tokens per question, mean / max | "
        "answer tokens x answers | first batch s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{r['questions_per_s_median_batch']:.2f} | {r['timed_questions']} | {_image_tokens(r)} | "
            f"{_counts(r)} | {_fmt(r.get('first_batch_s'), '.1f')} | "
            f"{_fmt(None if r.get('peak_bytes') is None else r['peak_bytes'] / GIB)} |"
        )
    examples = next((r["example_answers"] for r in ok if r.get("example_answers")), None)
    if examples:
        lines += ["", f"Example answers ({weights.lower()}): {examples}"]
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
        f"{'prep ms/q':>11}{'gen ms/q':>10}{'detok ms/q':>11}{'img tok mean/max':>18}"
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
            f"{_image_tokens(r):>18}"
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
