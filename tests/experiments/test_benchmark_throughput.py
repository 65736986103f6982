"""experiments.benchmark --mode=throughput: its arithmetic and pieces, and runs end to end on the CPU:
the tiny preset (JAX and transformers workers, the pre-compile phase, the report) and the tiny
LLaVA-NeXT one (photos of different image-token counts in one batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.benchmark import acceptance, configs, throughput, workers_throughput, workload
from experiments.benchmark.configs import BenchmarkConfig
from experiments.benchmark.driver import run_worker
from experiments.benchmark.jobs import common_spec
from experiments.benchmark.report import summary, write_outputs
from models.preprocess import Preprocessor, build_prompt
from models.presets import llava_config
from tests.helpers import REPO_ROOT, once_per_session, run_benchmark

ANSWER_TOKENS = 3


def test_throughput_summary_arithmetic():
    stages = [{"preprocess": 0.25, "generate": 0.5}, {"preprocess": 0.25, "generate": 1.5, "detokenize": 0.1}]
    result = workers_throughput.rate_summary(4, [1.0, 2.0], stages)
    assert result["timed_questions"] == 8 and result["timed_s"] == 3.0
    assert result["questions_per_s"] == 8 / 3 and result["ms_per_question"] == 3000 / 8
    assert result["questions_per_s_median_batch"] == 4 / 1.5
    per_question = result["stage_ms_per_question"]
    assert per_question["preprocess"] == 500 / 8 and per_question["generate"] == 2000 / 8
    assert per_question["detokenize"] == pytest.approx(100 / 8)
    assert per_question["other"] == pytest.approx((3000 - 500 - 2000 - 100) / 8)
    assert result["batch_ms"] == [1000.0, 2000.0]


def row(framework, method, batch, rate, keep=None, status="ok"):
    keep = (0 if method == "none" else 64) if keep is None else keep
    return dict(
        framework=framework, method=method, keep=keep, batch=batch, status=status, questions_per_s=rate
    )


def test_speedups_over_transformers_b1_and_unpruned_jax_at_the_same_batch():
    rows = [
        row("torch", "none", 1, 5.0),
        row("torch", "none", 32, 20.0),
        row("jax", "none", 32, 40.0),
        row("jax", "adaptprune", 32, 100.0),
        row("jax", "none", 128, 50.0),
        row("jax", "adaptprune", 128, 200.0),
        row("jax", "fastv", 8, 30.0),  # no unpruned row at batch 8
        row("jax", "fastv", 128, None, status="failed"),
    ]
    throughput.add_speedups(rows)
    by = {(r["framework"], r["method"], r["batch"]): r for r in rows}
    assert by["jax", "adaptprune", 128]["speedup_vs_transformers"] == 40.0
    assert by["jax", "adaptprune", 128]["speedup_vs_unpruned"] == 4.0
    assert by["jax", "adaptprune", 32]["speedup_vs_unpruned"] == 2.5
    assert by["torch", "none", 32]["speedup_vs_unpruned"] == 0.5  # transformers against JAX unpruned
    assert by["torch", "none", 1]["speedup_vs_transformers"] == 1.0
    assert (
        "speedup_vs_unpruned" not in by["jax", "fastv", 8]
        and by["jax", "fastv", 8]["speedup_vs_transformers"] == 6.0
    )
    assert "speedup_vs_transformers" not in by["jax", "fastv", 128]
    without_reference = [row("jax", "none", 4, 10.0)]
    throughput.add_speedups(without_reference)
    assert "speedup_vs_transformers" not in without_reference[0]


def test_each_other_padded_length_gets_a_warm_up_batch():
    def width(indices):
        return 704 if max(indices) >= 5 else 640

    timed = [[2, 3], [4, 5], [6, 7], [0, 1]]
    assert workers_throughput.warmup_batches([0, 1], timed, width) == [[0, 1], [4, 5]]
    assert workers_throughput.warmup_batches([0, 1], [[2, 3]], width) == [[0, 1]]


def job_work(model, questions=12):
    return workers_throughput.job_work(
        dict(
            model=model, distinct_questions=questions, seed=0, batch=2, timed_batches=1, min_timed_questions=1
        )
    )


@pytest.mark.parametrize("preset", ["tiny", "llava-1.5-7b", "tiny-next", "tiny-next-mistral"])
def test_both_frameworks_get_the_same_ids_and_pixels_left_padded_for_transformers(preset):
    """Each job builds its pieces itself: JAX's preprocessor and transformers' processor (LLaVA-NeXT:
    LlavaNextProcessor, whose crops it pads to the batch's most) see the same ids, image-token counts
    and pixels, one row left-padded."""
    work, other = job_work(preset), job_work(preset)  # as two processes build them
    config = work.hf_config
    preprocessor = Preprocessor(config, work.tokenizer, work.image_processor)
    processor = workers_throughput.llava_processor(config, other.tokenizer, other.image_processor)
    anyres = config.model_type == "llava_next"
    sizes = [preprocessor.image_sizes([work.workload.image_of(i)])[0] if anyres else None for i in range(12)]
    lengths = [len(preprocessor.encode(q.prompt, size)) for q, size in zip(work.workload.questions, sizes)]
    indices = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    assert lengths[indices[0]] < lengths[indices[1]]  # one row is padded
    images, questions = work.workload.batch(indices)
    template = config.text_config.model_type
    inputs = processor(
        images=images, text=[build_prompt(q, template) for q in questions], padding=True, return_tensors="np"
    )
    pixels = preprocessor.pixel_values(images)
    if anyres:  # transformers pads the crops to the batch's most, JAX to the model's most
        crops = inputs["pixel_values"].shape[1]
        assert crops <= pixels.shape[1] and not pixels[:, crops:].any()
        pixels = pixels[:, :crops]
        assert inputs["image_sizes"].tolist() == [list(sizes[i]) for i in indices]
    np.testing.assert_array_equal(inputs["pixel_values"], pixels)
    width = max(lengths[i] for i in indices)
    counts = []
    for ids, mask, question, index in zip(inputs["input_ids"], inputs["attention_mask"], questions, indices):
        ours = preprocessor.encode(question, sizes[index])
        pad = width - len(ours)
        assert ids[pad:].tolist() == ours and mask.tolist() == [0] * pad + [1] * len(ours)
        counts.append(ours.count(config.image_token_index))
        assert counts[-1] == preprocessor.image_token_count(sizes[index])
    assert (counts[0] < counts[1]) == anyres  # LLaVA-NeXT: a wider photo, fewer image tokens


def test_settings_the_mode_refuses(tmp_path):
    for settings, message in (
        (BenchmarkConfig(mode="throughput", model="/data/llava-1.5-7b-hf"), "runs a preset"),
        (BenchmarkConfig(mode="throughput", model="tiny", answer_tokens=0), "--answer_tokens"),
        (BenchmarkConfig(mode="throughput", model="tiny", configs=("none:0",)), "batch sizes"),
    ):
        with pytest.raises(ValueError, match=message):
            throughput.check_settings(settings)
    llava_config("tiny-next").save_pretrained(tmp_path)  # a checkpoint directory is taken
    throughput.check_settings(BenchmarkConfig(mode="throughput", model=str(tmp_path)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-next-mistral"])
def test_the_workload_gives_each_image_size_its_image_tokens_and_the_models_prompt(preset):
    work = throughput.workload_description(BenchmarkConfig(model=preset, distinct_questions=12))
    counts = work["image_tokens"]
    assert sorted(counts) == work["image_sizes"] and work["preset"] and work["random_weights"]
    if preset == "tiny":
        assert not work["anyres"] and set(counts.values()) == {576}
        assert "USER: <image>\nIs there a " in work["example_prompt"]
    else:  # LLaVA-NeXT: each aspect ratio its own count, a square photo the most
        assert work["anyres"] and counts["640x640"] == max(counts.values()) > min(counts.values())
        assert work["example_prompt"].startswith("[INST] <image>\nIs there a ")


def test_a_refused_method_fails_its_row_and_says_where_it_ran(tmp_path):
    """CDPruner reads CLIP's joint space, which the mode builds no tower for: a failed row, whose
    platform still tells the acceptance lines where the run was (not 'unknown')."""
    spec = dict(
        common_spec(BenchmarkConfig(model="tiny", compile_cache="")),
        kind="jax_throughput",
        mode="measure",
        method="cdpruner",
        keep=64,
        batch=2,
        answer_tokens=ANSWER_TOKENS,
        distinct_questions=8,
        timed_batches=1,
        min_timed_questions=1,
    )
    run_worker(json.dumps(spec), str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and "builds no CLIP text tower" in result["error"]
    assert result["platform"] == "cpu"
    report = {"meta": {"flags": {"model": "tiny"}}, "rows": [dict(result, label="cdpruner@64 b2")]}
    assert throughput.run_on(report) == ("tiny", "cpu")


def synthetic_report():
    rows = [
        dict(row("torch", "none", 1, 5.0), label="transformers b1"),
        dict(row("jax", "none", 128, 50.0), label="none b128"),
        dict(row("jax", "adaptprune", 128, 200.0), label="adaptprune@64 b128"),
        dict(row("jax", "fastv", 128, None, status="skipped"), label="fastv@64 b128", error="deadline"),
    ]
    for r in rows[:3]:
        r.update(
            workers_throughput.rate_summary(r["batch"], [r["batch"] / r["questions_per_s"]] * 2, [{}, {}]),
            answer_token_counts={"4": 2 * r["batch"]},
            device_kind="NVIDIA H200",
            platform="gpu",
            prompt_tokens={"min": 628, "mean": 628.5, "max": 629},
            peak_bytes=2**30,
            first_batch_s=1.0,
        )
    throughput.add_speedups(rows)
    meta = {
        "date": "2026-12-06",
        "command": "python -m experiments.benchmark --mode=throughput",
        "versions": {"jax": "0"},
        "flags": {"model": "llava-1.5-7b", "dtype": "bfloat16", "mode": "throughput"},
    }
    report = {
        "mode": "throughput",
        "meta": meta,
        "rows": rows,
        "workload": {
            "distinct_questions": 300,
            "questions_per_image": 6,
            "images": 7,
            "image_sizes": ["640x480"],
            "image_source": "photographs",
            "answer_tokens": 4,
            "example_prompt": build_prompt("Is there a cat in the image?"),
        },
    }
    report["acceptance"] = acceptance.throughput_acceptance(rows, throughput.run_on(report))
    return report


def test_report_table_speedups_and_acceptance(tmp_path):
    report = synthetic_report()
    assert throughput.run_on(report) == ("llava-1.5-7b", "gpu")
    write_outputs(report, [str(tmp_path)], final=True)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("# Throughput: llava-1.5-7b on NVIDIA H200")
    assert "| JAX | adaptprune@64 | 128 | 1 | 200.00 | 200.00 | 5.00 | 40.00x | 4.00x |" in markdown
    assert "| transformers | none | 1 | 1 | 5.00 | 5.00 | 200.00 | 1.00x | - |" in markdown
    assert "exactly 4 tokens" in markdown and "4 x 256" in markdown
    assert "questions/s adaptprune@64 b128 / transformers b1: 40.000x >= 20.0x: PASS" in markdown
    assert "- fastv@64 b128: skipped: deadline" in markdown
    assert (tmp_path / "questions_per_second.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == "throughput"
    printed = summary(report)
    assert (
        "adaptprune@64 b128" in printed and "[PASS] questions/s adaptprune@64 b128 / JAX unpruned" in printed
    )
    assert "acceptance: 2 pass, 0 fail" in printed


def test_rows_on_meshes_compare_with_unpruned_on_the_same_mesh(tmp_path):
    assert configs.planned_meshes(BenchmarkConfig(mesh=" data:1; data:2,model:2 ;")) == [
        "data:1",
        "data:2,model:2",
    ]
    assert configs.planned_meshes(BenchmarkConfig()) == [""]
    with pytest.raises(ValueError, match="unknown axis 'pipeline'"):
        configs.planned_meshes(BenchmarkConfig(mesh="data:2;pipeline:2"))
    report = synthetic_report()
    on_four = [
        dict(row("jax", "none", 128, 160.0), label="none b128 [data:4]", mesh="data:4,model:1", devices=4),
        dict(
            row("jax", "adaptprune", 128, 480.0), label="adaptprune@64 b128 [data:4]", mesh="data:4,model:1"
        ),
    ]
    on_four[1]["devices"] = 4
    for r in on_four:
        r.update(
            report["rows"][1],
            **{k: r[k] for k in ("method", "keep", "questions_per_s", "label", "mesh", "devices")},
        )
        r.update(workers_throughput.rate_summary(128, [128 / r["questions_per_s"]] * 2, [{}, {}]))
    report["rows"] += on_four
    throughput.add_speedups(report["rows"])
    assert on_four[1]["speedup_vs_unpruned"] == pytest.approx(3.0)  # 480 / 160, not 480 / 50
    assert report["rows"][2]["speedup_vs_unpruned"] == pytest.approx(4.0)  # one device: 200 / 50
    write_outputs(report, [str(tmp_path)], final=True)
    markdown = (tmp_path / "results.md").read_text()
    assert (
        "| JAX | adaptprune@64 | 128 | 4 (data:4,model:1) | 480.00 | 120.00 | 2.08 | 96.00x | 3.00x |"
        in markdown
    )


# --- end to end --------------------------------------------------------------------------------


def _run(tmp_path_factory):
    """tiny, float32: transformers at batches 1 and 2, JAX unpruned and AdaptPrune at batch 2 (both
    pre-compiled in parallel; a refused method's failed row is tested in process, in
    `test_a_refused_method_fails_its_row_and_says_where_it_ran`). JAX attends through XLA's fused
    call, not the CPU's default einsum, so a run that dropped --attention on its way to a worker shows."""
    output_dir = tmp_path_factory.mktemp("throughput_run")
    process = run_benchmark(
        "--mode=throughput",
        "--model=tiny",
        "--dtype=float32",
        "--attention=xla",
        "--configs=none:2,adaptprune:64:2",
        "--torch_baseline",
        "--torch_batch_sizes=1,2",
        f"--answer_tokens={ANSWER_TOKENS}",
        "--distinct_questions=8",
        "--timed_batches=2",
        "--min_timed_questions=3",
        "--compile_workers=2",
        f"--compile_cache={output_dir / 'cache'}",
        f"--output_dir={output_dir}",
        timeout=600,
    )
    return {
        "report": json.loads((output_dir / "results.json").read_text()),
        "markdown": (output_dir / "results.md").read_text(),
        "stdout": process.stdout,
        "plot": (output_dir / "questions_per_second.png").read_bytes()[:4].hex(),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return once_per_session(tmp_path_factory, "benchmark_throughput_run", lambda: _run(tmp_path_factory))


@pytest.mark.slow
def test_every_configuration_answers_every_question_asked_with_the_set_token_count(run):
    rows = {r["label"]: r for r in run["report"]["rows"]}
    assert list(rows) == ["transformers b1", "transformers b2", "none b2", "adaptprune@64 b2"]
    for label in ("transformers b1", "transformers b2", "none b2", "adaptprune@64 b2"):
        r = rows[label]
        assert r["status"] == "ok", r
        asked = r["batch"] * workload.timed_batch_count(r["batch"], 2, 3)
        assert r["timed_questions"] == r["answers_returned"] == asked
        assert r["answer_token_counts"] == {str(ANSWER_TOKENS): asked}
        assert len(r["batch_ms"]) == r["timed_batches"] and r["questions_per_s"] > 0
        assert set(r["stage_ms_per_question"]) == {"preprocess", "generate", "detokenize", "other"}
        assert r["speedup_vs_transformers"] > 0 and r["platform"] == "cpu"
    for label in ("none b2", "adaptprune@64 b2"):
        r = rows[label]
        assert r["precompile"]["status"] == "ok" and r["traces_while_timed"] == 0
        assert r["attention"] == r["precompile"]["attention"] == "xla"
        assert r["prompt_tokens"]["min"] > r["image_tokens"]["max"] == 576 and r["speedup_vs_unpruned"] > 0
    assert rows["adaptprune@64 b2"]["keep"] == 64 and rows["adaptprune@64 b2"]["layer"] == 2
    assert rows["transformers b2"]["image_tokens"] == {"min": 576, "mean": 576, "max": 576}


@pytest.mark.slow
def test_the_report_records_the_work_and_leaves_the_targets_unjudged_on_a_cpu(run):
    report, markdown = run["report"], run["markdown"]
    assert report["mode"] == "throughput" and report["meta"]["flags"]["mode"] == "throughput"
    assert (
        report["workload"]["distinct_questions"] == 8 and report["workload"]["answer_tokens"] == ANSWER_TOKENS
    )
    assert "USER: <image>\nIs there a " in report["workload"]["example_prompt"]
    assert [check["pass"] for check in report["acceptance"]] == [None, None]
    assert "| JAX | adaptprune@64 | 2 |" in markdown and "| transformers | none | 1 |" in markdown
    assert "576 image tokens per image" in markdown and "| 576 / 576 |" in markdown
    assert "## Failed or skipped" not in markdown and run["plot"] == b"\x89PNG".hex()
    assert "Attention (vision tower, LLM prefill and decoding): xla (--attention=xla)" in markdown
    assert "acceptance: 0 pass, 0 fail, 2 not measured here" in run["stdout"]


NEXT_WORK = dict(answer_tokens=2, distinct_questions=7, timed_batches=3, min_timed_questions=6)


def _next_run(tmp_path_factory):
    """tiny-next, float32, the fewest questions that mix two photos in a batch: seven (six about a
    square photo, one about a wide one), JAX AdaptPrune at batch 2 (timed batches [2, 3], [4, 5],
    [6, 0]; the unpruned row's path is the same but for the selection, and the LLaVA-1.5 run has one).
    No pre-compile phase (its LLaVA-NeXT programs are the measured ones by
    construction: `LlavaRunner.pad_batch`) and no transformers rows (a process each:
    `test_transformers_answers_the_same_llava_next_questions_with_the_same_image_tokens`)."""
    output_dir = tmp_path_factory.mktemp("throughput_next_run")
    run_benchmark(
        "--mode=throughput",
        "--model=tiny-next",
        "--dtype=float32",
        "--configs=adaptprune:64:2",
        "--notorch_baseline",
        *(f"--{name}={value}" for name, value in NEXT_WORK.items()),
        "--compile_workers=0",
        f"--compile_cache={output_dir / 'cache'}",
        f"--output_dir={output_dir}",
        timeout=600,
    )
    return {
        "report": json.loads((output_dir / "results.json").read_text()),
        "markdown": (output_dir / "results.md").read_text(),
    }


@pytest.fixture(scope="module")
def next_run(tmp_path_factory):
    return once_per_session(
        tmp_path_factory, "benchmark_throughput_next_run", lambda: _next_run(tmp_path_factory)
    )


@pytest.mark.slow
def test_llava_next_rows_answer_photos_of_their_own_image_token_counts(next_run):
    report, markdown = next_run["report"], next_run["markdown"]
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["adaptprune@64 b2"]
    counts = report["workload"]["image_tokens"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["timed_questions"] == r["answers_returned"] == 6 and r["answer_token_counts"] == {"2": 6}
        assert r["anyres"] and r["platform"] == "cpu" and r["traces_while_timed"] == 0
        # five questions about the square photo, one about the wide one, padded to the square's count
        tokens = r["image_tokens"]
        assert tokens["max"] == counts["640x640"] > tokens["min"] == counts["640x426"]
        assert r["image_slots"] == [tokens["max"]] and r["prompt_tokens"]["max"] > tokens["max"]
        assert r["warmup_batches"] == 2  # every row full ([0, 1]), then a row padded ([6, 0])
    assert rows["adaptprune@64 b2"]["keep"] == 64 and rows["adaptprune@64 b2"]["layer"] == 2
    assert "anyres preprocessing" in markdown and f"640x426: {counts['640x426']}" in markdown
    assert f"| {tokens['mean']:g} / {tokens['max']} |" in markdown
    assert "this run is tiny-next on cpu" in markdown


@pytest.mark.slow
def test_transformers_answers_the_same_llava_next_questions_with_the_same_image_tokens(next_run):
    """The transformers worker, in this process: LlavaNextProcessor left-pads the batch that mixes
    the photos, and expands each prompt's image to the count JAX's rows put there."""
    import torch

    threads = torch.get_num_threads()  # the worker runs single-threaded on a CPU
    try:
        result = workers_throughput.torch_throughput_worker(
            dict(model="tiny-next", dtype="float32", seed=0, batch=2, **NEXT_WORK)
        )
    finally:
        torch.set_num_threads(threads)
    assert result["status"] == "ok" and result["platform"] == "cpu"
    assert result["timed_questions"] == result["answers_returned"] == 6
    assert result["answer_token_counts"] == {"2": 6}
    assert result["image_tokens"] == next_run["report"]["rows"][0]["image_tokens"]


def test_the_h200_flagfile_measures_what_the_targets_need_within_one_call():
    from absl import flags

    from experiments.benchmark.configs import Config, planned_configs
    from experiments.flag_config import define_flags, from_flags

    flag_values = define_flags(BenchmarkConfig, flags.FlagValues())
    flag_values(["benchmark", f"--flagfile={REPO_ROOT}/experiments/flags/benchmark_h200_throughput.flags"])
    settings = from_flags(BenchmarkConfig, flag_values)
    throughput.check_settings(settings)
    configs = planned_configs(settings)
    target = acceptance.THROUGHPUT_BATCH
    assert settings.mode == "throughput" and settings.model == acceptance.TARGET_MODEL
    assert configs[:2] == [
        Config("none", 0, target),
        Config(acceptance.ACCEPT_METHOD, acceptance.ACCEPT_KEEP, target),
    ]
    assert settings.torch_baseline and acceptance.TORCH_REFERENCE_BATCH in settings.torch_batch_sizes
    assert 0 < settings.deadline_s < 600 and settings.job_timeout_s < settings.deadline_s


def test_the_two_gpu_scaling_flagfile_gives_each_gpu_the_target_batch():
    from absl import flags

    from experiments.flag_config import define_flags, from_flags

    flag_values = define_flags(BenchmarkConfig, flags.FlagValues())
    path = f"{REPO_ROOT}/experiments/flags/benchmark_h200x2_throughput_scaling.flags"
    flag_values(["benchmark", f"--flagfile={path}"])
    settings = from_flags(BenchmarkConfig, flag_values)
    throughput.check_settings(settings)
    target = acceptance.THROUGHPUT_BATCH
    assert settings.mode == "throughput" and settings.model == acceptance.TARGET_MODEL
    assert [(configs.mesh_label(config, mesh)) for config, mesh in configs.planned_runs(settings)] == [
        f"none b{target} [data:1]",
        f"none b{2 * target} [data:2]",
        f"{acceptance.ACCEPT_METHOD}@{acceptance.ACCEPT_KEEP} b{target} [data:1]",
        f"{acceptance.ACCEPT_METHOD}@{acceptance.ACCEPT_KEEP} b{2 * target} [data:2]",
    ]
    assert 0 < settings.deadline_s < 600 and settings.job_timeout_s < settings.deadline_s
