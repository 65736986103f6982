"""experiments.benchmark --mode=throughput: its arithmetic and pieces, and one run end to end on the
CPU with the tiny preset (JAX and transformers workers, the pre-compile phase, the report)."""

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
from models.presets import llava15_image_processor, llava_config
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


@pytest.mark.parametrize("preset", ["tiny", "llava-1.5-7b"])
def test_both_frameworks_get_the_same_ids_and_pixels_left_padded_for_transformers(preset):
    work = workload.build_workload(12, seed=0)
    config = llava_config(preset)
    texts = [build_prompt("")] + [q.prompt for q in work.questions]
    tokenizer = workload.word_tokenizer(config, texts)
    preprocessor = Preprocessor(config, tokenizer, llava15_image_processor(config))
    processor = workers_throughput.llava_processor(config, workload.word_tokenizer(config, texts))
    lengths = [len(preprocessor.encode(q.prompt)) for q in work.questions]
    indices = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    assert lengths[indices[0]] < lengths[indices[1]]  # one row is padded
    images, questions = work.batch(indices)
    inputs = processor(
        images=images, text=[build_prompt(q) for q in questions], padding=True, return_tensors="np"
    )
    np.testing.assert_array_equal(inputs["pixel_values"], preprocessor.pixel_values(images))
    width = max(lengths[i] for i in indices)
    for ids, mask, question in zip(inputs["input_ids"], inputs["attention_mask"], questions):
        ours = preprocessor.encode(question)
        pad = width - len(ours)
        assert ids[pad:].tolist() == ours and mask.tolist() == [0] * pad + [1] * len(ours)


def test_settings_the_mode_refuses():
    for settings, message in (
        (BenchmarkConfig(mode="throughput", model="/data/llava-1.5-7b-hf"), "runs a preset"),
        (BenchmarkConfig(mode="throughput", model="tiny", answer_tokens=0), "--answer_tokens"),
        (BenchmarkConfig(mode="throughput", model="tiny", configs=("none:0",)), "batch sizes"),
    ):
        with pytest.raises(ValueError, match=message):
            throughput.check_settings(settings)


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
        assert r["prompt_tokens"]["min"] > r["image_tokens"] == 576 and r["speedup_vs_unpruned"] > 0
    assert rows["adaptprune@64 b2"]["keep"] == 64 and rows["adaptprune@64 b2"]["layer"] == 2


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
    assert "## Failed or skipped" not in markdown and run["plot"] == b"\x89PNG".hex()
    assert "Attention (vision tower and LLM prefill): xla (--attention=xla)" in markdown
    assert "acceptance: 0 pass, 0 fail, 2 not measured here" in run["stdout"]


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
