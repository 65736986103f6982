"""The trace summary behind the benchmark's --profile_dir: per device thread, overlaps counted once."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from experiments.benchmark import profiling


def _trace():
    """A device with a kernel stream and a derived 'XLA Ops' line, plus host events that must not count.
    Timestamps in microseconds, as Chrome traces are."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "Stream #7"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "XLA Ops"}},
    ]
    kernels = [  # busy: [0, 30) and [50, 60) -> 40 us of a 60 us span; gemm twice (25 us), fusion (15 us)
        {"ph": "X", "pid": 1, "tid": 10, "ts": 0.0, "dur": 20.0, "name": "gemm"},
        {"ph": "X", "pid": 1, "tid": 10, "ts": 10.0, "dur": 20.0, "name": "fusion.1"},  # overlaps the gemm
        {"ph": "X", "pid": 1, "tid": 10, "ts": 50.0, "dur": 10.0, "name": "gemm"},
    ]
    ops = [{"ph": "X", "pid": 1, "tid": 11, "ts": 0.0, "dur": 60.0, "name": "dot"}]
    host = [{"ph": "X", "pid": 2, "tid": 3, "ts": 0.0, "dur": 1000.0, "name": "python"}]
    return meta + kernels + ops + host


def test_summary_per_device_thread_counts_overlap_once():
    summary = profiling.summarize_events(_trace(), calls=2)
    threads = {t["thread"]: t for t in summary["device_threads"]}
    assert set(threads) == {"Stream #7", "XLA Ops"}  # the host's 1000 us are not device time
    stream = threads["Stream #7"]
    assert stream["events_per_call"] == 1.5
    assert stream["sum_ms_per_call"] == pytest.approx(50e-3 / 2)
    assert stream["busy_ms_per_call"] == pytest.approx(40e-3 / 2)
    assert stream["span_ms_per_call"] == pytest.approx(60e-3 / 2)
    assert stream["busy_fraction"] == pytest.approx(40 / 60)
    assert [t["name"] for t in stream["top"]] == ["gemm", "fusion.1"]
    assert stream["top"][0]["count_per_call"] == 1.0 and stream["top"][0]["share_of_sum"] == pytest.approx(
        0.6
    )
    assert profiling.main_thread(summary)["thread"] == "XLA Ops"  # the busiest line wins
    assert threads["XLA Ops"]["busy_fraction"] == pytest.approx(1.0)
    # The host's threads instead (where a call's dispatch and graph launch show), by process name
    host = profiling.summarize_events(_trace(), calls=2, prefixes=("/host:",))["device_threads"]
    assert [t["thread"] for t in host] == ["3"] and host[0]["sum_ms_per_call"] == pytest.approx(0.5)


def test_kernel_sequence_is_the_stream_s_last_call_in_order():
    kernels = profiling.kernel_sequence(_trace(), calls=1)
    assert [(k["name"], k["us"], k["start_us"]) for k in kernels] == [
        ("gemm", 20.0, 0.0),
        ("fusion.1", 20.0, 10.0),
        ("gemm", 10.0, 50.0),
    ]  # the stream, not the busier derived 'XLA Ops' line, nor the host
    last = profiling.kernel_sequence(_trace(), calls=3)
    assert [(k["name"], k["start_us"], k["end_us"]) for k in last] == [("gemm", 0.0, 10.0)]
    assert profiling.kernel_sequence([], calls=1) == []


def test_union_length():
    assert profiling.union_length([]) == 0.0
    assert profiling.union_length([(5, 7), (0, 2), (1, 3), (6, 9)]) == pytest.approx(3 + 4)


def test_trace_files_found_and_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        profiling.find_trace(str(tmp_path))
    nested = tmp_path / "plugins" / "profile" / "2026_12_01"
    os.makedirs(nested)
    with gzip.open(nested / profiling.PERFETTO_FILE, "wt") as handle:
        json.dump({"displayTimeUnit": "ns", "traceEvents": _trace()}, handle)
    path = profiling.find_trace(str(tmp_path))
    assert profiling.load_events(path) == _trace()
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(_trace()))  # a bare event list is a Chrome trace too
    assert len(profiling.load_events(str(plain))) == len(_trace())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"traceEvents": {"not": "a list"}}))
    with pytest.raises(ValueError, match="not a Chrome trace"):
        profiling.load_events(str(bad))
    with pytest.raises(ValueError, match="calls must be >= 1"):
        profiling.summarize_events(_trace(), calls=0)


def test_profile_call_traces_a_jitted_function(tmp_path):
    """The real jax.profiler path on this machine's backend: a trace file is written and summarised
    (a CPU trace has no /device: process, so no device threads; on a GPU there are)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    summary = profiling.profile_call(lambda: f(x), str(tmp_path), calls=2, units_per_call=3)
    assert os.path.isfile(summary["trace"]) and summary["calls"] == 6
    if jax.default_backend() == "cpu":
        assert summary["device_threads"] == []


def test_fused_ops_names_each_fusion_as_its_kernel_and_lists_its_opcodes():
    import jax
    import jax.numpy as jnp

    from experiments.benchmark.layer_kernels import fused_ops

    hlo = jax.jit(lambda x: jnp.exp(x * 2.0) + 1.0).lower(jnp.ones((64, 64))).compile().as_text()
    ops = fused_ops(hlo)
    fusions = [entry for name, entry in ops.items() if "." not in name and entry["kind"]]
    assert fusions, hlo
    assert any({"exponential", "multiply", "add"} <= set(entry["ops"]) for entry in fusions)
    assert all(entry["shape"].startswith("f32[64,64]") for entry in fusions)


def test_layer_kernels_programs_run_and_decode_from_each_prefill():
    import jax
    import numpy as np

    from experiments.benchmark.layer_kernels import LayerKernelsConfig, _programs

    settings = LayerKernelsConfig(
        model="tiny", layers=2, layer=1, keep=4, text_tokens=8, extra_slots=3, decode_steps=3
    )
    programs = dict((name, (fn, args)) for name, fn, args in _programs(settings))
    assert list(programs) == [
        "vision",
        "llm_prefill_unpruned",
        "llm_decode3_unpruned",
        "llm_prefill_adaptprune4",
        "llm_decode3_adaptprune4",
    ]
    for name in ("unpruned", "adaptprune4"):
        fn, args = programs[f"llm_decode3_{name}"]
        tokens = np.asarray(jax.block_until_ready(fn(*args)))
        vocab = args[1].shape[-1]
        assert tokens.shape == (1, 4) and ((tokens >= 0) & (tokens < vocab)).all(), tokens
        # The first token is the prefill's own argmax, the rest come from the decode steps.
        assert tokens[0, 0] == int(np.argmax(np.asarray(args[1])[0]))


def test_layer_kernels_programs_filter_by_kind():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.benchmark.layer_kernels import LayerKernelsConfig, _programs
    from models import presets

    tiny = dict(model="tiny", layers=2, layer=1, keep=4, text_tokens=8, extra_slots=3, decode_steps=3)
    names = [name for name, _, _ in _programs(LayerKernelsConfig(**tiny, programs=("vision", "decode")))]
    assert names == ["vision", "llm_decode3_unpruned", "llm_decode3_adaptprune4"]
    (vision,) = _programs(LayerKernelsConfig(**tiny, programs=("vision",)))
    assert vision[0] == "vision"
    features = np.asarray(jax.block_until_ready(vision[1](*vision[2])).astype(jnp.float32))
    assert (
        features.shape[:2] == (1, presets.llava_config("tiny").image_seq_length)
        and np.isfinite(features).all()
    )


def test_kernels_are_sorted_into_kinds_and_summed_per_kind():
    from experiments.benchmark.layer_kernels import busy_by_kind, kernel_kind

    kernels = [
        {"name": "nvjet_sm90_tst_128x288_bias_NNT", "us": 80.0},  # a cuBLAS GEMM: no HLO ops of its own
        {"name": "gemm_fusion_dot_3", "us": 20.0, "ops": ["dot"]},
        {"name": "fusion_7", "us": 11.0, "ops": ["add", "broadcast", "dot"]},  # a Triton GEMM with its bias
        {"name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "us": 70.0},
        {"name": "fusion_634", "us": 50.0, "ops": ["add", "convert", "multiply", "reduce", "rsqrt"]},
        {"name": "loop_multiply_fusion_22", "us": 54.0, "ops": ["divide", "exponential", "multiply"]},
        {"name": "loop_slice_fusion_67", "us": 14.0, "ops": ["bitcast", "slice"]},
        {"name": "Memset 0", "us": 0.75},
        {"name": "loop_add_fusion_2", "us": 21.0, "ops": ["add", "select"]},
        {"name": "ln_tma_fwd_kernel", "us": 12.0},  # a library kernel with no known prefix
    ]
    kinds = [kernel_kind(kernel) for kernel in kernels]
    assert kinds == [
        "gemm", "gemm", "gemm", "attention", "norm", "activation", "layout", "memory", "other", "other"
    ]  # fmt: skip
    summary = busy_by_kind(kernels)
    assert list(summary) == ["gemm", "attention", "activation", "norm", "other", "layout", "memory"]
    assert summary["gemm"] == {"kernels": 3, "busy_us": 111.0}
    assert summary["other"] == {"kernels": 2, "busy_us": 33.0}
    assert sum(entry["busy_us"] for entry in summary.values()) == sum(k["us"] for k in kernels)


def test_layer_kernels_refuses_bad_settings_before_building_a_model(monkeypatch):
    from experiments.benchmark import layer_kernels

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for settings that are refused")

    monkeypatch.setattr(layer_kernels, "random_model", no_model)
    with pytest.raises(ValueError, match=r"unknown --programs \['prefil'\]; valid: vision, prefill, decode"):
        layer_kernels._programs(layer_kernels.LayerKernelsConfig(model="tiny", programs=("prefil",)))
    with pytest.raises(ValueError, match="--decode_steps=4 needs as many cache slots past the prompt"):
        layer_kernels._programs(layer_kernels.LayerKernelsConfig(model="tiny", extra_slots=3, decode_steps=4))


def test_layer_kernels_option_sets_are_parsed_and_bad_ones_refused_before_building_a_model(
    monkeypatch, tmp_path
):
    from experiments.benchmark import layer_kernels

    assert layer_kernels.parse_option_sets([]) == {"": {}}
    assert layer_kernels.parse_option_sets(["base", "tma:xla_a=true;xla_b=3", "c:xla_d=cuBLAS"]) == {
        "base": {},
        "tma": {"xla_a": True, "xla_b": 3},
        "c": {"xla_d": "cuBLAS"},
    }

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for settings that are refused")

    monkeypatch.setattr(layer_kernels, "random_model", no_model)
    bad = {
        ":xla_a=1": "bad --option_sets entry ':xla_a=1'",
        "a/b:xla_a=1": "a TAG without '/'",
        "a:xla_a": r"bad --option_sets \(a\) entry 'xla_a': expected OPTION=VALUE",
    }
    for entry, message in bad.items():
        with pytest.raises(ValueError, match=message):
            layer_kernels.run(
                layer_kernels.LayerKernelsConfig(model="tiny", option_sets=(entry,), output_dir=str(tmp_path))
            )
    with pytest.raises(ValueError, match="--option_sets names 'a' twice"):
        layer_kernels.run(
            layer_kernels.LayerKernelsConfig(
                model="tiny", option_sets=("a", "a:x=1"), output_dir=str(tmp_path)
            )
        )


@pytest.mark.slow  # compiles and traces the tiny vision tower twice, and refuses a third set
def test_layer_kernels_lists_each_program_once_per_option_set(tmp_path):
    from experiments.benchmark import layer_kernels

    settings = layer_kernels.LayerKernelsConfig(
        model="tiny",
        layers=1,
        programs=("vision",),
        option_sets=("plain", "nofast:xla_cpu_enable_fast_math=false", "refused:no_such_xla_option=1"),
        calls=1,
        wall_repeats=1,
        output_dir=str(tmp_path),
    )
    results = layer_kernels.run(settings)
    names = ["plain/vision", "nofast/vision", "refused/vision"]
    assert list(results["programs"]) == names
    assert results["option_sets"]["nofast"] == {"xla_cpu_enable_fast_math": False}
    # The options reach the compiler: one it does not know fails that set alone, recorded.
    assert "no_such_xla_option" in results["programs"]["refused/vision"]["error"]
    written = json.loads((tmp_path / "kernels.json").read_text())
    assert list(written["programs"]) == names
    assert written["programs"]["nofast/vision"]["wall_ms_median"] > 0
    for tag in ("plain", "nofast"):
        with gzip.open(tmp_path / tag / "vision.hlo.txt.gz", "rt") as handle:
            assert "HloModule" in handle.read()
