"""experiments.benchmark end to end on the CPU with the tiny preset (the GPU runs the same code).

Every job is a subprocess, so these tests run the real CLI: pre-compile phase, measuring workers, the
PyTorch baseline, a max-batch probe, a configuration that cannot work (reported as a failed row), a
profile that is taken beside one that cannot be, and workers killed by their timeout; then the report
files. One run covers all but the killed workers (the tests below read its report); float32 and 2 new
tokens keep it fast, and the compilation cache is shared by the runs of this module.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from experiments.benchmark import acceptance, configs, floors, max_batch
from tests.helpers import REPO_ROOT, fake_devices_env, once_per_session, run_benchmark


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def run_cli(output_dir, cache_dir, *args, env=None):
    process = run_benchmark(
        "--model=tiny",
        "--dtype=float32",
        "--new_tokens=2",
        "--text_tokens=8",
        "--repeats=2",
        "--e2e_repeats=1",
        f"--output_dir={output_dir}",
        f"--compile_cache={cache_dir}",
        *args,
        timeout=300,
        env=env,
    )
    with open(os.path.join(output_dir, "results.json")) as f:
        report = json.load(f)
    with open(os.path.join(output_dir, "results.md")) as f:
        markdown = f.read()
    with open(os.path.join(output_dir, "time_memory_vs_tokens.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(output_dir, "worker_logs.txt")) as f:
        assert "===== ceilings" in f.read()
    return report, markdown, process.stdout


def rows_by_label(report):
    return {row["label"]: row for row in report["rows"]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    return once_per_session(
        tmp_path_factory, "benchmark_full_run", lambda: _full_run(tmp_path_factory, cache_dir)
    )


def _full_run(tmp_path_factory, cache_dir):
    """One run with everything but killed workers: pre-compile (2 processes), the unpruned and the
    pruned row with their PyTorch rows, a keep that cannot work (at batch 2, which the PyTorch baseline
    leaves out), a max-batch probe, per-stage compiler options and a smaller attention-logits budget,
    and profiles: the unpruned row's are taken, the pruned row's cannot start (a file where its traces
    would go)."""
    output_dir = tmp_path_factory.mktemp("full_run")
    profile_dir = output_dir / "profiles"
    profile_dir.mkdir()
    (profile_dir / "adaptprune-k64-b1").write_text("a file where the traces would go")
    report, markdown, stdout = run_cli(
        output_dir,
        cache_dir,
        "--configs=none:1,adaptprune:64:1,adaptprune:100000:2",
        "--torch_baseline",
        "--torch_batch_sizes=1",
        "--max_batch_search",
        "--max_batch_configs=none",
        "--max_batch_cap=2",
        "--max_batch_probes=1",
        "--compile_workers=2",
        f"--profile_dir={profile_dir}",
        "--attention_logits_budget_mb=0.5",
        "--stage_compiler_options=generate:xla_disable_hlo_passes=dot-merger",
        "--method_settings=adaptprune.similarity_precision='bf16_bf16_f32_x6'",
        "--runner_first_token",
    )
    with open(output_dir / "worker_logs.txt") as f:
        logs = f.read()
    return dict(report=report, markdown=markdown, stdout=stdout, logs=logs, profile_dir=str(profile_dir))


@pytest.mark.slow
def test_run_records_its_command_environment_and_ceilings(full_run):
    meta, ceilings = full_run["report"]["meta"], full_run["report"]["ceilings"]
    assert {"jax", "torch", "transformers"} <= set(meta["versions"]) and meta["date"]
    assert (
        meta["command"].startswith("python -m experiments.benchmark")
        and "--torch_baseline" in meta["command"]
    )
    assert meta["flags"]["torch_baseline"] is True and meta["flags"]["torch_batch_sizes"] == [1]
    assert meta["env"]["JAX_PLATFORMS"] == "cpu"  # the environment the workers inherit is recorded
    assert ceilings["status"] == "ok" and ceilings["device_kind"]
    assert ceilings["copy_bytes_per_s"] > 0 and ceilings["matmul_flops_per_s"] > 0


@pytest.mark.slow
def test_measured_rows_with_floors_and_torch_ratios(full_run):
    rows = rows_by_label(full_run["report"])
    assert list(rows) == [
        "none b1",
        "pytorch none b1",
        "adaptprune@64 b1",
        "pytorch cut@64 b1",
        "adaptprune@100000 b2",
    ]
    base, pruned = rows["none b1"], rows["adaptprune@64 b1"]
    for row in (base, pruned):
        assert row["status"] == "ok", row
        for key in (
            "vision_ms",
            "llm_prefill_ms",
            "llm_prefill_pipelined_ms",
            "ttft_ms",
            "ttft_runner_ms",
            "decode_ms_per_token",
            "e2e_ms",
        ):
            assert row[key] > 0 and row["floors"][key] > 0 and row["ratio_to_floor"][key] > 0
        assert row["compile_s"]["prefill"] >= 0 and row["compiled_memory"]["prefill"] is not None
        assert row["weights_bytes"] > 0 and row["prompt_tokens"] == row["image_tokens"] + 8
        assert row["jax_over_torch"]["ttft_ms"] > 0
        # every worker traced under the flags' budget and compiler options, pre-compiled first
        assert row["attention_logits_budget_bytes"] == 2**19
        assert row["stage_compiler_options"] == {"generate": {"xla_disable_hlo_passes": "dot-merger"}}
        assert row["precompile"]["status"] == "ok"
    assert pruned["keep"] == 64 and pruned["layer"] == 2
    # --method_settings reaches the method's workers, and only that method's
    assert pruned["method_settings"] == {"similarity_precision": "bf16_bf16_f32_x6"}
    assert base["method_settings"] == {}
    assert pruned["work"]["prefill_tokens_per_layer"][-1] == 8 + 64
    assert {"fixed_prefill_ms", "selection_overhead_ms", "select_only_ms"} <= set(pruned)
    assert pruned["speedup_vs_unpruned"]["ttft_ms"] > 0 and pruned["torch_row"] == "pytorch cut@64 b1"
    assert pruned["speedup_vs_unpruned"]["ttft_runner_ms"] > 0 and "runner_prefill" in pruned["compile_s"]
    assert "## Host latency and the runner's path" in full_run["markdown"]
    for label in ("pytorch none b1", "pytorch cut@64 b1"):
        assert rows[label]["status"] == "ok" and rows[label]["framework"] == "torch"
        assert (
            rows[label]["ttft_ms"] > 0 and rows[label]["e2e_ms"] > 0 and rows[label]["generated_tokens"] == 2
        )


@pytest.mark.slow
def test_a_configuration_that_cannot_work_is_a_failed_row(full_run):
    impossible = rows_by_label(full_run["report"])["adaptprune@100000 b2"]
    assert impossible["status"] == "failed" and "keep=100000" in impossible["error"]
    assert impossible["precompile"]["status"] == "failed"  # the pre-compile phase raised it
    assert "jax-adaptprune-k100000-b2: failed in pre-compile, not run" in full_run["stdout"]
    assert "===== jax-adaptprune-k100000-b2" not in full_run["logs"]  # no measuring process for it
    markdown = full_run["markdown"]
    assert "## Failed or skipped" in markdown and "adaptprune@100000 b2" in markdown


@pytest.mark.slow
def test_profiles_taken_and_failed_to_start(full_run):
    rows = rows_by_label(full_run["report"])
    base, pruned = rows["none b1"], rows["adaptprune@64 b1"]
    assert set(base["profile"]) == set(pruned["profile"]) == {"vision", "llm_prefill", "decode_step"}
    assert base["profile"]["vision"]["calls"] == base["profile"]["llm_prefill"]["calls"] == 3
    assert base["profile"]["decode_step"]["calls"] == 1  # 2 new tokens
    for summary in base["profile"].values():
        assert os.path.isfile(summary["trace"]) and summary["trace"].startswith(full_run["profile_dir"])
    # a profile that cannot be taken is recorded as such; the row's timings survive it (asserted above)
    assert all("NotADirectoryError" in stage["error"] for stage in pruned["profile"].values())
    assert "## Profile" in full_run["markdown"] and "NotADirectoryError" in full_run["markdown"]


@pytest.mark.slow
def test_max_batch_probe_acceptance_and_report(full_run):
    report, markdown = full_run["report"], full_run["markdown"]
    (search,) = report["max_batch"]
    assert search["config"] == "none" and search["largest_fit"] >= 1
    assert [p["batch"] for p in search["probes"]] == [2] and search["probes"][0]["fits"]
    assert len(report["acceptance"]) == len(acceptance.TARGETS)
    assert all({"name", "pass", "detail"} <= set(c) for c in report["acceptance"])
    assert "| config | metric | ms | floor ms |" in markdown and "## PyTorch" in markdown
    assert full_run["stdout"].strip().splitlines()[-1].startswith("acceptance:")


@pytest.mark.slow
def test_killed_workers_are_failed_rows(tmp_path, cache_dir):
    # planned from --batch_sizes x --methods; without --torch_baseline no PyTorch job runs
    report, markdown, _ = run_cli(
        tmp_path, cache_dir, "--batch_sizes=1", "--methods=none", "--job_timeout_s=1"
    )
    (row,) = report["rows"]
    assert row["label"] == "none b1" and row["framework"] == "jax"
    assert row["status"] == "failed" and "timed out" in row["error"]
    assert all(check["pass"] is None for check in report["acceptance"])
    assert "## PyTorch" not in markdown and report["meta"]["flags"]["torch_baseline"] is False


@pytest.mark.slow
def test_a_model_axis_of_two_devices_answers_as_one_device(tmp_path, cache_dir, full_run):
    """The stage timings on a mesh of two fake CPU devices (model:2, built through models.sharding as
    the evaluation builds it, no pre-compile phase): the row records its mesh, its floors are a
    device's share, and its greedy answers are the one-device row's of the full run (same seed, so
    the same weights and inputs)."""
    report, markdown, _ = run_cli(
        tmp_path,
        cache_dir,
        "--configs=none:1",
        "--mesh=model:2",
        "--repeats=1",
        "--compile_workers=2",
        "--attention_logits_budget_mb=0.5",
        env=fake_devices_env(2),
    )
    (row,) = report["rows"]
    one_device = rows_by_label(full_run["report"])["none b1"]
    assert row["label"] == "none b1 [model:2]" and row["status"] == "ok", row
    assert (row["mesh"], row["devices"]) == ("data:1,model:2", 2) and "precompile" not in row
    assert row["weights_bytes_per_device"] < row["weights_bytes"] == one_device["weights_bytes"]
    assert row["peak_bytes"] is None and "select_only_ms" not in row
    assert row["floors"]["decode_weight_read_ms"] == pytest.approx(
        row["work"]["decode_weight_bytes"] / 2 / report["ceilings"]["copy_bytes_per_s"] * 1e3
    )
    assert row["first_tokens"] == one_device["first_tokens"]
    assert row["generated_tokens_row0"] == one_device["generated_tokens_row0"]
    assert row["first_token_logits"] == pytest.approx(one_device["first_token_logits"], abs=1e-5)
    assert "none b1 [model:2]" in markdown and "Rows on a mesh" in markdown
    assert all(check["pass"] is None for check in report["acceptance"])


def test_each_configuration_runs_on_every_mesh_in_turn():
    settings = configs.BenchmarkConfig(configs=("none:1", "adaptprune:64:16"), mesh="data:1;data:2,model:2")
    runs = configs.planned_runs(settings)
    assert [configs.mesh_label(config, mesh) for config, mesh in runs] == [
        "none b1 [data:1]",
        "none b1 [data:2,model:2]",
        "adaptprune@64 b16 [data:1]",
        "adaptprune@64 b16 [data:2,model:2]",
    ]
    assert configs.mesh_job_suffix("data:2,model:2") == "-data2-model2" and configs.mesh_job_suffix("") == ""
    per_device = dataclasses.replace(settings, batch_per_device=True)
    assert [config.batch for config, _ in configs.planned_runs(per_device)] == [1, 2, 16, 32]
    alone = configs.planned_runs(dataclasses.replace(per_device, mesh=""))
    assert alone == [(configs.Config("none", 0, 1), ""), (configs.Config("adaptprune", 64, 16), "")]


def stage_row(method, keep, ttft_ms, mesh="", devices=1, framework="jax"):
    """A measured row of the stage timings with its work (one device's numbers: 1e12 FLOPs, 1e9 bytes)."""
    work = dict(
        vision_flops=1e12,
        vision_bytes=1e9,
        prefill_flops=1e12,
        prefill_bytes=1e9,
        llm_stream_bytes=0.5e9,
        decode_flops=1e12,
        decode_bytes=1e9,
        decode_weight_bytes=0.5e9,
        kv_cache_bytes_allocated=2**20,
    )
    name = method + (f"@{keep}" if keep else "")
    return dict(
        framework=framework,
        method=method,
        keep=keep,
        batch=16,
        status="ok",
        label=f"{name} b16" + (f" [{mesh}]" if mesh else ""),
        mesh=mesh,
        devices=devices,
        new_tokens=2,
        work=work,
        compile_s={"prefill": 1.0},
        compiled_memory={},
        weights_bytes=2**30,
        **{
            key: ttft_ms
            for key in ("vision_ms", "llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "e2e_ms")
        },
    )


def test_rows_on_a_mesh_take_a_devices_share_of_the_floors_and_compare_within_their_mesh(tmp_path):
    from experiments.benchmark.report import results_markdown

    rows = [
        stage_row("none", 0, 30.0, "data:1,model:1"),
        stage_row("adaptprune", 64, 10.0, "data:1,model:1"),
        stage_row("none", 0, 20.0, "data:1,model:2", 2),
        stage_row("adaptprune", 64, 8.0, "data:1,model:2", 2),
        stage_row("none", 0, 60.0, framework="torch"),
    ]
    ceilings = {"status": "ok", "copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e15}  # 1 ms per GB, TFLOP
    floors.add_floors_and_ratios(rows, ceilings)
    one, pruned_one, two, pruned_two, _ = rows
    assert pruned_one["speedup_vs_unpruned"]["ttft_ms"] == pytest.approx(3.0)
    assert pruned_two["speedup_vs_unpruned"]["ttft_ms"] == pytest.approx(2.5)  # 20 / 8, not 30 / 8
    assert one["floors"]["decode_ms_per_token"] == pytest.approx(1.0)
    # model:2: the language model's weights (0.5 GB) and the KV bytes (0.5 GB) both split in two
    assert two["floors"]["decode_ms_per_token"] == pytest.approx(0.5)
    assert two["floors"]["decode_weight_read_ms"] == pytest.approx(0.25)
    assert two["floors"]["vision_ms"] == one["floors"]["vision_ms"]  # the CLIP tower whole on both
    data_two = floors.per_device_work(one["work"], "data:2,model:1")  # weights whole on both devices
    assert data_two["decode_bytes"] == 0.75e9 and data_two["vision_flops"] == 0.5e12
    assert one["jax_over_torch"]["ttft_ms"] == pytest.approx(0.5) and "jax_over_torch" not in two
    report = {
        "meta": {
            "flags": {"model": "tiny", "dtype": "float32"},
            "date": "now",
            "command": "c",
            "versions": {},
        },
        "ceilings": ceilings,
        "rows": rows,
        "max_batch": [],
        "acceptance": [],
    }
    markdown = results_markdown(report)
    assert "## Meshes: each configuration on data:1,model:1, data:1,model:2" in markdown
    assert "| none b16 | first token | 30.000 | 20.000 | 1.50x |" in markdown
    assert "| adaptprune@64 b16 [data:1,model:2] | first token | 8.000 |" in markdown


def test_the_13b_model_axis_flagfile_compares_two_gpus_with_one_within_one_call():
    from absl import flags

    from experiments.flag_config import define_flags, from_flags
    from models.config import from_hf_config
    from models.presets import llava_config

    flag_values = define_flags(configs.BenchmarkConfig, flags.FlagValues())
    path = f"{REPO_ROOT}/experiments/flags/benchmark_h200x2_13b_model_axis.flags"
    flag_values(["benchmark", f"--flagfile={path}"])
    settings = from_flags(configs.BenchmarkConfig, flag_values)
    assert settings.mode == "stages" and settings.model == "llava-1.5-13b" and settings.dtype == "bfloat16"
    runs = configs.planned_runs(settings)
    assert [(config.method, config.keep, config.batch) for config, _ in runs[::2]] == [
        ("none", 0, 1),
        (acceptance.ACCEPT_METHOD, acceptance.ACCEPT_KEEP, 1),
        ("none", 0, 16),
        (acceptance.ACCEPT_METHOD, acceptance.ACCEPT_KEEP, 16),
    ]
    assert [mesh for _, mesh in runs] == ["data:1", "model:2"] * 4  # each on one GPU, then on two
    assert from_hf_config(llava_config(settings.model)).text.num_kv_heads % 2 == 0
    assert 0 < settings.deadline_s < 600 and settings.job_timeout_s < settings.deadline_s


def test_only_a_refused_configuration_skips_its_measuring_process():
    from experiments.benchmark.driver import _precompile_refused

    refused = {"status": "failed", "error": "ValueError: keep=9 exceeds ...", "traceback": "..."}
    assert _precompile_refused(refused)
    assert _precompile_refused(dict(refused, error="TypeError: keep must be an int"))
    for measured_anyway in (
        None,
        {"status": "ok"},
        dict(refused, error="XlaRuntimeError: INTERNAL: ptxas exited with non-zero error code"),
        {"status": "failed", "error": "worker timed out after 240 s without a result: ..."},
        dict(refused, status="oom", error="ValueError: RESOURCE_EXHAUSTED"),
    ):
        assert not _precompile_refused(measured_anyway), measured_anyway


def test_method_settings_are_checked_before_any_worker_starts():
    from experiments.benchmark.jobs import common_spec

    def spec(*entries):
        return common_spec(
            configs.BenchmarkConfig(configs=("none:1", "adaptprune:64:1"), method_settings=entries)
        )["method_settings"]

    assert spec("adaptprune.similarity_precision='highest'") == {
        "adaptprune": {"similarity_precision": "highest"}
    }
    with pytest.raises(ValueError, match="'fastv' is not among this run's methods"):
        spec("fastv.layer=3")
    # a method only the largest-batch search runs takes settings too
    searched = configs.BenchmarkConfig(
        configs=("none:1",),
        max_batch_search=True,
        max_batch_configs=("pyramiddrop:64@2",),
        method_settings=("pyramiddrop.layers=2/3",),
    )
    assert common_spec(searched)["method_settings"] == {"pyramiddrop": {"layers": (2, 3)}}
    with pytest.raises(ValueError, match="adaptprune has no setting 'precision'"):
        spec("adaptprune.precision='highest'")


def test_a_jax_worker_process_imports_no_torch():
    """transformers' configuration classes import PyTorch whenever it is installed; a JAX worker hides it
    first, as an environment without torch (make eval's) would."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from experiments.benchmark.driver import _without_torch\n"
        "_without_torch()\n"
        "from models.presets import llava_config\n"
        "from transformers.utils import is_torch_available\n"
        "llava_config('tiny')\n"
        "print(is_torch_available(), sys.modules['torch'])\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.split() == ["False", "None"]
    assert "PyTorch was not found" not in process.stderr  # the advisory note is silenced


def test_a_worker_gets_its_method_settings_back_as_they_were_parsed():
    """A tuple travels in the job's JSON as a list; configs are hashed (static to jit), so it must be a
    tuple again in the worker."""
    from adaptprune_jax import make_config
    from experiments.benchmark.workers import method_settings

    spec = json.loads(json.dumps({"method_settings": {"pyramiddrop": {"layers": (2, 3), "scalar": 0.5}}}))
    assert method_settings(spec, "pyramiddrop") == {"layers": (2, 3), "scalar": 0.5}
    assert method_settings(spec, "fastv") == {} and method_settings({}, "fastv") == {}
    hash(make_config("pyramiddrop", keep=64, **{"layers": method_settings(spec, "pyramiddrop")["layers"]}))


def test_parse_config():
    assert configs.parse_config("none:4") == configs.Config("none", 0, 4)
    assert configs.parse_config("fastv:128:16") == configs.Config("fastv", 128, 16)
    assert configs.parse_config("adaptprune:64", batch=0).name == "adaptprune@64"
    with pytest.raises(ValueError, match="METHOD:KEEP:BATCH"):
        configs.parse_config("adaptprune:1")


def test_max_batch_check_decides_only_what_the_bounds_prove():
    def search(method, keep, fit, fail):
        return {"method": method, "keep": keep, "largest_fit": fit, "smallest_failure": fail}

    def verdict(base, pruned):
        return acceptance.acceptance([], [base, pruned])[-2]["pass"]

    assert verdict(search("none", 0, 128, 160), search("adaptprune", 64, 512, None)) is True
    assert verdict(search("none", 0, 128, 160), search("adaptprune", 64, 192, 224)) is False
    assert verdict(search("none", 0, 128, None), search("adaptprune", 64, 512, None)) is None


def test_batch_search_grows_then_bisects():
    def search(start, true_max, **settings):
        state = max_batch.BatchSearch(
            configs.Config("none", 0, 0), [], start, configs.BenchmarkConfig(**settings)
        )
        while (batch := state.pending()) is not None:
            state.record(batch, {"status": "ok" if batch <= true_max else "oom", "fits": batch <= true_max})
        return state.summary()

    found = search(136, 150, max_batch_growth=1.1, max_batch_probes=8, max_batch_tolerance=0.05)
    assert [p["batch"] for p in found["probes"]][:3] == [136, 149, 163]
    assert found["largest_fit"] <= 150 < found["smallest_failure"]
    assert found["smallest_failure"] - found["largest_fit"] <= 0.05 * found["largest_fit"]
    # A start above the limit shrinks by the growth factor until something fits.
    shrunk = search(200, 150, max_batch_growth=1.1, max_batch_probes=3, max_batch_tolerance=0.05)
    assert [p["batch"] for p in shrunk["probes"]] == [200, 181, 164]
    # Doubling (the default) from a known fit, capped.
    doubled = search(None, 1000, max_batch_probes=4, max_batch_cap=8)
    assert [p["batch"] for p in doubled["probes"]] == [1, 2, 4, 8] and doubled["smallest_failure"] is None


def test_floor_rates_take_the_faster_of_in_run_and_reference():
    ceilings = {"status": "ok", "copy_bytes_per_s": 3.0e12, "matmul_flops_per_s": 700e12}
    floors.set_floor_rates(ceilings, bandwidth_tbps=4.3, matmul_tflops=600)
    assert ceilings["floor_bytes_per_s"] == 4.3e12 and ceilings["floor_bytes_source"] == "reference"
    assert ceilings["floor_flops_per_s"] == 700e12 and ceilings["floor_flops_source"] == "in-run"
    assert floors._floor_ms(7e12, 4.3e12, ceilings) == pytest.approx(1e3)  # 10 ms FLOPs vs 1 s bytes
    with pytest.raises(ValueError, match="reference rate must be >= 0"):
        floors.set_floor_rates(ceilings, bandwidth_tbps=-1)


@pytest.mark.slow
def test_replot_with_reference_rates_rejudges_the_committed_h200_latency_run(tmp_path):
    """The H200 run's in-run copy ceiling (3.1 TB/s) passed decode; against 4.3 TB/s it fails."""
    with open(os.path.join(REPO_ROOT, "experiments/results/h200_latency/results.json")) as f:
        committed = json.load(f)
    (tmp_path / "results.json").write_text(json.dumps(committed))
    run_benchmark(
        f"--replot={tmp_path / 'results.json'}",
        "--reference_bandwidth_tbps=4.3",
        "--reference_matmul_tflops=788",
        timeout=300,
    )
    report = json.loads((tmp_path / "results.json").read_text())
    base = rows_by_label(report)["none b1"]
    assert base["floors"]["decode_weight_read_ms"] == pytest.approx(
        base["work"]["decode_weight_bytes"] / 4.3e9
    )
    assert base["floors"]["llm_prefill_flop_ms"] == pytest.approx(base["work"]["prefill_flops"] / 788e9)
    before = {c["name"]: c for c in committed["acceptance"]}
    after = {c["name"]: c for c in report["acceptance"]}
    decode = "decode b1 / weight-read floor"
    assert before[decode]["pass"] is True and after[decode]["pass"] is False
    floor = base["floors"]["decode_weight_read_ms"]
    assert after[decode]["value"] == pytest.approx(base["decode_ms_per_token"] / floor)
    assert report["meta"]["command"] == committed["meta"]["command"]  # the run's own command is kept
    markdown = (tmp_path / "results.md").read_text()
    assert "re-judged against reference rates" in markdown and "4.30 TB/s (reference)" in markdown


def test_stage_compiler_options_parse_and_name_bad_entries():
    parsed = configs.parse_stage_compiler_options(
        [
            "generate:xla_gpu_enable_triton_gemm=false",
            "prefill:xla_disable_hlo_passes=dot-merger",
            "generate:xla_gpu_graph_min_graph_size=1",
        ]
    )
    assert parsed == {
        "generate": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_graph_min_graph_size": 1},
        "prefill": {"xla_disable_hlo_passes": "dot-merger"},
    }
    with pytest.raises(ValueError, match="unknown stage 'decode'; stages: vision, embed, prefill"):
        configs.parse_stage_compiler_options(["decode:xla_gpu_enable_triton_gemm=false"])
    with pytest.raises(ValueError, match="expected STAGE:OPTION=VALUE"):
        configs.parse_stage_compiler_options(["generate:xla_gpu_enable_triton_gemm"])


@pytest.mark.slow
def test_llava_next_flagfile_on_the_tiny_next_preset(tmp_path, cache_dir):
    """The LLaVA-NeXT flagfile's run shrunk to the tiny-next preset, one pruned configuration: the
    image packed into crops and tokens as the processor would, the fixed-index prefill, the floors,
    transformers' LlavaNext on the same shapes, and the LLaVA-NeXT targets listed but not judged."""
    from models import anyres
    from models.config import from_hf_config
    from models.presets import llava_config

    report, _, _ = run_cli(
        tmp_path,
        cache_dir,
        "--flagfile=experiments/flags/benchmark_h200_next.flags",
        "--model=tiny-next",
        "--dtype=float32",
        "--new_tokens=2",
        "--text_tokens=8",
        "--repeats=1",
        "--e2e_repeats=1",
        "--image_size=336x336",
        "--configs=fastv:64:1",
        "--compile_workers=0",
        "--deadline_s=0",
        f"--output_dir={tmp_path}",
        f"--compile_cache={cache_dir}",
    )
    cfg = from_hf_config(llava_config("tiny-next"))
    tokens, crops = anyres.image_token_count((336, 336), cfg), anyres.num_crops((336, 336), cfg)
    rows = rows_by_label(report)
    assert list(rows) == ["fastv@64 b1", "pytorch cut@64 b1"]
    jax_row, torch_row = rows["fastv@64 b1"], rows["pytorch cut@64 b1"]
    assert jax_row["status"] == "ok" and torch_row["status"] == "ok", (jax_row, torch_row)
    for row in (jax_row, torch_row):
        assert (row["image_tokens"], row["crops"], row["image_size"]) == (tokens, crops, "336x336")
        assert row["prompt_tokens"] == tokens + 8
    assert jax_row["anyres"] and jax_row["work"]["prefill_tokens_per_layer"][-1] == 8 + 64
    assert jax_row["selection_overhead_ms"] is not None and jax_row["select_only_ms"] > 0
    assert jax_row["floors"]["vision_ms"] > 0 and jax_row["jax_over_torch"]["ttft_ms"] > 0
    names = [check["name"] for check in report["acceptance"]]
    assert f"first token speedup fastv@{acceptance.NEXT_KEEP} b1" in names
    assert all(check["pass"] is None for check in report["acceptance"])


def test_image_size_packs_llava_next_and_is_refused_elsewhere():
    from experiments.benchmark.workers import benchmark_image
    from models import anyres
    from models.config import from_hf_config
    from models.presets import llava_config

    next_cfg, cfg = from_hf_config(llava_config("tiny-next")), from_hf_config(llava_config("tiny"))
    base = cfg.vision.image_size
    image = benchmark_image(next_cfg, "672x672")
    assert image == (
        (672, 672),
        anyres.image_token_count((672, 672), next_cfg),
        anyres.num_crops((672, 672), next_cfg),
    )
    assert image.num_tokens == next_cfg.num_image_tokens  # the largest square pinpoint takes the most
    assert benchmark_image(next_cfg, "").size == (base, base)
    assert benchmark_image(cfg, "") == ((base, base), cfg.num_image_tokens, None)
    with pytest.raises(ValueError, match="other sizes are for LLaVA-NeXT"):
        benchmark_image(cfg, "672x672")
    with pytest.raises(ValueError, match="expected HEIGHTxWIDTH"):
        benchmark_image(next_cfg, "672")
