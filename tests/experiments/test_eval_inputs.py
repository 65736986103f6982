"""Bad input fails early with a specific message; flagfiles parse; published numbers and overlays.

Nothing here generates text: every error is raised before the first batch, so these tests share the
tiny checkpoint of the e2e tests (conftest's session fixture) and need no compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from adaptprune_jax import methods
from experiments import eval as eval_lib
from experiments import reference_numbers
from experiments.overlays import kept_patch_mask, overlay_kept_patches
from models.config import from_hf_config
from models.presets import llava_config

REPO = Path(__file__).resolve().parents[2]
FLAGFILES = {
    name: REPO / "experiments" / "flags" / f"{name}.flags"
    for name in ("testbed", "testbed_gpu", "testbed_deep_gpu", "pope_llava15_7b")
}


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    from models.engine import LlavaEngine

    return LlavaEngine.from_checkpoint(tiny_checkpoints("tiny").directory)


@pytest.fixture
def config(tiny_checkpoints, tmp_path):
    """A valid POPE config over one question whose image exists."""
    questions = tmp_path / "questions"
    images = tmp_path / "images"
    questions.mkdir()
    images.mkdir()
    line = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}
    (questions / "coco_pope_random.json").write_text(json.dumps(line) + "\n")
    (images / "a.jpg").write_bytes(b"")  # existence is all these checks look at
    return eval_lib.EvalConfig(
        checkpoint=tiny_checkpoints("tiny").directory,
        benchmark="pope",
        questions=str(questions),
        image_dir=str(images),
        output_dir=str(tmp_path / "out"),
    )


def test_unknown_method_lists_the_known_ones(config):
    with pytest.raises(ValueError) as error:
        eval_lib.run(dataclasses.replace(config, methods=("fastv", "tome")))
    message = str(error.value)
    assert "'tome'" in message
    for name in ("none", "adaptprune", "fastv", "random", "uniform", "divprune"):
        assert name in message
    assert not os.path.exists(config.output_dir)


def test_unknown_benchmark_lists_the_known_ones(config):
    with pytest.raises(ValueError) as error:
        eval_lib.run(dataclasses.replace(config, benchmark="vqav2"))
    for name in ("'vqav2'", "pope", "mme", "gqa", "textvqa", "scienceqa", "testbed"):
        assert name in str(error.value)


def test_missing_question_file_names_the_path(config, tmp_path):
    missing = tmp_path / "nowhere" / "coco_pope_random.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        eval_lib.run(dataclasses.replace(config, questions=str(missing)))


def test_missing_image_folder_names_the_path(config, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'coco'}"):
        eval_lib.run(dataclasses.replace(config, image_dir=str(tmp_path / "coco")))


def test_image_folder_without_any_question_image_fails_fast(config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the 1 questions' images exists; e\.g\. .*a\.jpg"):
        eval_lib.run(dataclasses.replace(config, image_dir=str(tmp_path / "empty")))


def test_image_dir_is_required_where_the_benchmark_has_no_own_folder(config):
    with pytest.raises(ValueError, match="--image_dir is required for benchmark 'pope'"):
        eval_lib.run(dataclasses.replace(config, image_dir=None))


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (10_000, "keep=10000 exceeds num_image_tokens=576"),
        (0, "keep=0 must be >= 1"),
        (0.0001, "gives int"),
    ],
)
def test_keep_out_of_range_raises_the_config_error_before_any_work(config, engine, keep, message):
    with pytest.raises(ValueError, match=message):
        eval_lib.run(dataclasses.replace(config, methods=("adaptprune",), keep=(64, keep)), engine=engine)
    assert not os.path.exists(config.output_dir)  # nothing written, nothing generated


def test_layer_out_of_range_is_the_config_error(config, engine):
    with pytest.raises(ValueError, match="layer=9 is out of range for fastv"):
        eval_lib.run(dataclasses.replace(config, methods=("fastv",), layer=9), engine=engine)


def test_output_dir_with_other_answer_settings_is_refused(config, engine):
    """Predictions recorded under another max_new_tokens and attention implementation (as resolved)
    are refused, naming both settings."""
    from experiments.evaluation import fingerprint

    benchmark = eval_lib.get_benchmark("pope")
    unpruned = eval_lib.build_pairs(config, engine.config.num_image_tokens, engine.config.text.num_layers)[0]
    recorded = fingerprint.pair_fingerprint(
        fingerprint.shared_fingerprint(config, benchmark, 8, "cudnn"), unpruned
    )
    predictions = Path(config.output_dir, eval_lib.PREDICTIONS_DIR)
    predictions.mkdir(parents=True)
    (predictions / f"{unpruned.name}.jsonl").write_text(json.dumps({"question_id": "1", "prediction": "yes"}))
    Path(config.output_dir, eval_lib.RUN_FINGERPRINT_JSON).write_text(
        json.dumps({"pairs": {unpruned.name: recorded}})
    )
    assert engine.config.text.attention == "einsum"
    with pytest.raises(
        ValueError,
        match=rf"{unpruned.name}: setting attention: 'cudnn' -> 'einsum'; setting max_new_tokens: 8 -> 32",
    ):
        eval_lib.run(config, engine=engine)


def test_predictions_without_a_fingerprint_are_refused(config, engine):
    """Prediction files from older code (no fingerprint) are not silently mixed in."""
    unpruned = f"{eval_lib.UNPRUNED}_{engine.config.num_image_tokens}"
    predictions = Path(config.output_dir, eval_lib.PREDICTIONS_DIR)
    predictions.mkdir(parents=True)
    (predictions / f"{unpruned}.jsonl").write_text(json.dumps({"question_id": "1", "prediction": "yes"}))
    with pytest.raises(ValueError, match=rf"{unpruned}: no recorded fingerprint"):
        eval_lib.run(config, engine=engine)


def test_fingerprint_names_the_changed_method_file_and_only_its_own(tmp_path, monkeypatch):
    """A method's file is part of its own pairs' fingerprint and of no other pair's."""
    from experiments.evaluation import fingerprint

    source = tmp_path / "edited_method.py"
    source.write_text(
        "import dataclasses\n"
        "from adaptprune_jax.methods.fastv import FastVConfig\n\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class EditedConfig(FastVConfig):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_method

    shared = {"checkpoint": {}, "settings": {}, "code": {"models.llama": "x"}}
    pair = eval_lib.Pair("edited", 64, 64, edited_method.EditedConfig(keep=64), 64.0)
    before = fingerprint.pair_fingerprint(shared, pair)
    source.write_text(source.read_text() + "# a change\n")
    after = fingerprint.pair_fingerprint(shared, pair)
    assert fingerprint.differences(before, after) == ["code of edited_method changed"]
    unpruned = fingerprint.pair_fingerprint(shared, eval_lib.Pair("none", 576, None, None, 576.0))
    assert "edited_method" not in unpruned["code"]
    fastv_pair = eval_lib.Pair("fastv", 64, 64, methods.make_config("fastv", keep=64), 64.0)
    assert set(fingerprint.pair_fingerprint(shared, fastv_pair)["code"]) == {
        "models.llama",
        "adaptprune_jax.methods.fastv",
    }


def test_a_method_reading_clip_needs_the_text_tower(config, engine):
    with pytest.raises(
        ValueError, match="--methods cdpruner: reads CLIP's joint space; give --text_tower=DIR"
    ):
        eval_lib.run(dataclasses.replace(config, methods=("fastv", "cdpruner")), engine=engine)
    with pytest.raises(FileNotFoundError, match="--text_tower directory not found: /nowhere"):
        eval_lib.run(dataclasses.replace(config, methods=("cdpruner",), text_tower="/nowhere"), engine=engine)
    assert not os.path.exists(config.output_dir)


def test_the_text_tower_files_are_in_its_methods_fingerprints_only(config, tiny_checkpoints):
    from experiments.evaluation import fingerprint

    config = dataclasses.replace(config, text_tower=tiny_checkpoints("tiny").clip_directory)
    shared = fingerprint.shared_fingerprint(config, eval_lib.get_benchmark("pope"), 32, "einsum")
    cdpruner = eval_lib.Pair("cdpruner", 64, 64, methods.make_config("cdpruner", keep=64), 64.0)
    fastv = eval_lib.Pair("fastv", 64, 64, methods.make_config("fastv", keep=64), 64.0)
    reading = fingerprint.pair_fingerprint(shared, cdpruner)["checkpoint"]
    assert {"text_tower/config.json", "text_tower/model.safetensors", "text_tower/tokenizer.json"} <= set(
        reading
    )
    assert fingerprint.pair_fingerprint(shared, fastv)["checkpoint"] == shared["checkpoint"]
    assert "text_tower" not in fingerprint.pair_fingerprint(shared, fastv)


def test_shared_fingerprint_leaves_the_method_files_out(config):
    """Every library and model module is in the shared code part, no registered method's file."""
    from experiments.evaluation import fingerprint

    shared = fingerprint.shared_fingerprint(config, eval_lib.get_benchmark("pope"), 32, "einsum")
    assert {"models.llama", "models.pruning", "adaptprune_jax.nms", "adaptprune_jax.methods.base"} <= set(
        shared["code"]
    )
    assert not {cls.__module__ for cls in methods.METHODS.values()} & set(shared["code"])
    assert set(shared["checkpoint"]) >= {"config.json", "model.safetensors"}


def test_parse_keep_and_pairs():
    assert eval_lib.parse_keep("64") == 64 and eval_lib.parse_keep("0.25") == 0.25
    with pytest.raises(ValueError, match="neither a token count"):
        eval_lib.parse_keep("half")
    model = from_hf_config(llava_config("llava-1.5-7b"))
    config = eval_lib.EvalConfig(
        checkpoint="c",
        benchmark="pope",
        questions="q",
        output_dir="o",
        methods=("fastv", "none", "divprune", "fastv"),
        keep=(192, 1 / 3, 0.25),
        layer=3,
    )
    pairs = eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers)
    # 'none' once and first; 1/3 of 576 resolves to 192 and is evaluated once; DivPrune has no layer.
    assert [pair.name for pair in pairs] == [
        "none_576",
        "fastv_192",
        "fastv_144",
        "divprune_192",
        "divprune_144",
    ]
    assert pairs[1].pruning.layer == 3 and pairs[3].pruning.layer == 0
    assert pairs[1].equivalent_tokens == pytest.approx((3 * 576 + 29 * 192) / 32)


def test_a_method_registered_elsewhere_is_evaluated_like_the_builtin_ones():
    # tests/keynorm_method.py registers keynorm_fastv (as --method_modules would import it).
    assert "keynorm_fastv" in eval_lib.known_method_names()
    model = from_hf_config(llava_config("llava-1.5-7b"))
    config = eval_lib.EvalConfig(
        checkpoint="c",
        benchmark="pope",
        questions="q",
        output_dir="o",
        methods=("keynorm_fastv",),
        method_modules=("tests.keynorm_method",),
        keep=(64,),
        layer=3,
    )
    pairs = eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers)
    assert [pair.name for pair in pairs] == ["none_576", "keynorm_fastv_64"]
    assert pairs[1].pruning.layer == 3


def test_method_settings_reach_their_method_and_bad_ones_are_named():
    model = from_hf_config(llava_config("llava-1.5-7b"))

    def pairs(*settings, methods=("pyramiddrop", "visionzip")):
        config = eval_lib.EvalConfig(
            checkpoint="c",
            benchmark="pope",
            questions="q",
            output_dir="o",
            methods=methods,
            keep=(64,),
            method_settings=settings,
        )
        return eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers)

    chosen = pairs("pyramiddrop.layers=2/8/16", "visionzip.contextual=5")
    assert chosen[1].pruning.layers == (2, 8, 16) and chosen[2].pruning.contextual == 5
    assert chosen[1].equivalent_tokens == pytest.approx((2 * 576 + 6 * 276 + 8 * 133 + 16 * 64) / 32)
    assert pairs()[1].pruning.layers is None
    for bad, message in [
        ("pyramiddrop.depth=3", "pyramiddrop has no setting 'depth'; its settings: keep, layers"),
        ("fastv.layer=3", "'fastv' is not among this run's methods"),
        ("pyramiddrop=3", "expected method.setting=value"),
        ("visionzip.contextual=five", "'five' is not a Python literal"),
        ("pyramiddrop.layers=8/4", "layers must increase"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            pairs(bad)


def test_a_budget_a_method_has_no_setting_for_is_skipped_with_a_warning(caplog):
    config = eval_lib.EvalConfig(
        checkpoint="c",
        benchmark="testbed",
        questions="q",
        output_dir="o",
        methods=("sparsevlm", "fastv"),
        keep=(192, 32),
    )
    with caplog.at_level("WARNING"):
        pairs = eval_lib.build_pairs(config, 576, 32)
    assert [pair.name for pair in pairs] == ["none_576", "sparsevlm_113", "fastv_192", "fastv_32"]
    assert "skipping sparsevlm at keep=32: sparsevlm has no released schedule" in caplog.text
    with pytest.raises(ValueError, match="exceeds num_image_tokens"):  # other errors still stop the run
        eval_lib.build_pairs(dataclasses.replace(config, keep=(1000,)), 576, 32)


def _takes_budgets(name, keeps) -> bool:
    """Whether method ``name`` has a setting for each budget (SparseVLM has released ones only)."""
    try:
        for keep in keeps:
            methods.make_config(name, strict=False, keep=eval_lib.parse_keep(keep))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(FLAGFILES))
def test_shipped_flagfiles_parse_and_fit_their_model(name):
    """Every flagfile gives a complete config whose budgets fit LLaVA-1.5's geometry (576 tokens, 32
    layers; the testbed model keeps that image grid) and whose benchmark and methods exist."""
    flag_values = eval_lib.define_flags(flags.FlagValues())
    flag_values(["eval", f"--flagfile={FLAGFILES[name]}"])
    config = eval_lib.config_from_flags(flag_values)
    model = from_hf_config(llava_config("llava-1.5-7b"))
    pairs = eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers)
    assert {pair.method for pair in pairs} == {"none", *config.methods}
    eval_lib.get_benchmark(config.benchmark)
    if name.startswith("testbed"):
        checkpoint = "checkpoints/testbed-deep" if name == "testbed_deep_gpu" else "checkpoints/testbed"
        assert config.benchmark == "testbed" and config.checkpoint == checkpoint
        assert config.questions == "experiments/data/testbed_test" and config.image_dir is None
        assert config.text_tower == f"{checkpoint}/clip"  # the testbed's own CLIP text tower
    if name == "testbed":  # make eval: every built-in method that takes each of its budgets
        builtin = {n for n in methods.names() if methods.get(n).__module__.startswith("adaptprune_jax.")}
        usable = {n for n in builtin if _takes_budgets(n, config.keep)}
        assert config.limit and config.dtype == "float32" and set(config.methods) == usable
    if name in ("testbed_gpu", "testbed_deep_gpu"):
        assert config.limit is None and config.dtype == "bfloat16" and set(config.keep) == {192, 128, 64, 32}
    if name == "pope_llava15_7b":
        assert config.image_dir and config.questions == "/work/shared/data/pope"
        assert reference_numbers.lookup(config.model_name, "pope", "none")


def test_reference_lookup_by_checkpoint_folder_name():
    for name in ("/ckpts/llava-1.5-7b-hf/", "llava-hf/llava-1.5-7b-hf", "LLaVA-v1.5-7B"):
        assert reference_numbers.canonical_model_name(name) == "llava-1.5-7b"
    unpruned = reference_numbers.lookup("/ckpts/llava-1.5-7b-hf", "pope", "none", 576)
    assert {entry.value for entry in unpruned} == {85.9}
    assert all(entry.source for entry in reference_numbers.REFERENCE_NUMBERS)
    (fastv,) = reference_numbers.lookup("llava-1.5-7b", "pope", "fastv", 192)
    assert fastv.value == 64.8 and "VisionZip" in fastv.source
    assert reference_numbers.lookup("llava-1.5-7b", "pope", "fastv", 100) == []
    assert reference_numbers.lookup("testbed", "testbed", "none") == []
    assert reference_numbers.lookup(None, "pope", "none") == []
    (mme,) = reference_numbers.lookup("llava-1.5-7b", "mme", "none")
    assert mme.value == 1510.7 and mme.metric == "perception_score"


def test_comparable_value_uses_the_published_aggregate():
    result = {
        "metrics": {"overall": {"f1": 0.5}, "per_category": {"random": {"f1": 0.9}, "popular": {"f1": 0.7}}}
    }
    pope = reference_numbers.lookup("llava-1.5-7b", "pope", "none")[0]
    assert reference_numbers.comparable_value(pope, result) == pytest.approx(80.0)
    gqa = reference_numbers.lookup("llava-1.5-7b", "gqa", "none")[0]
    assert reference_numbers.comparable_value(
        gqa, {"metrics": {"overall": {"accuracy": 0.6}}}
    ) == pytest.approx(60.0)


def test_kept_patch_mask_follows_the_config_grid():
    def config(image_size, patch_size, cls_token):
        grid = image_size // patch_size
        return types.SimpleNamespace(
            vision=types.SimpleNamespace(grid_size=grid, patch_size=patch_size),
            num_image_tokens=grid * grid + cls_token,
        )

    square = config(28, 7, 0)  # a 4 x 4 grid
    mask = kept_patch_mask([0, 5, 15], square)
    assert mask.shape == (4, 4) and mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[3, 3]
    with_cls = config(28, 7, 1)  # 'full' strategy: token 0 is [CLS], token 1 is patch (0, 0)
    assert np.argwhere(kept_patch_mask([0, 1, 16], with_cls)).tolist() == [[0, 0], [3, 3]]
    # Tokens merged inside the LLM (-1, after the kept ones) cover no patch.
    np.testing.assert_array_equal(kept_patch_mask([0, 5, 15, -1, -1], square), mask)
    np.testing.assert_array_equal(kept_patch_mask([1, -1], with_cls), kept_patch_mask([1], with_cls))

    image = np.ones((28, 28, 3))
    shown = overlay_kept_patches(image, mask, 7)
    assert shown[3, 3, 0] == 1.0 and shown[3, 10, 0] < 1.0 and shown[10, 10, 0] == 1.0


def test_a_layer_for_a_method_without_one_is_named(caplog):
    model = from_hf_config(llava_config("llava-1.5-7b"))
    config = eval_lib.EvalConfig(
        checkpoint="c",
        benchmark="pope",
        questions="q",
        output_dir="o",
        methods=("divprune", "fastv"),
        layer=3,
    )
    with caplog.at_level("WARNING"):
        pairs = eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers)
    assert [pair.pruning.layer for pair in pairs[1:]] == [0, 3]
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == ["divprune has no pruning layer setting: --layer=3 does not apply to it"]


def test_pairs_are_checked_against_the_model_layout():
    """Under the 'full' strategy token 0 is [CLS], on no grid: a grid method is refused up front with
    the message generation would give."""
    hf_config = llava_config("tiny")
    hf_config.vision_feature_select_strategy = "full"
    model = from_hf_config(hf_config)
    config = eval_lib.EvalConfig(
        checkpoint="c", benchmark="pope", questions="q", output_dir="o", methods=("uniform",)
    )
    with pytest.raises(ValueError, match="uniform: needs every image token on a grid, but 1 of the"):
        eval_lib.build_pairs(config, model.num_image_tokens, model.text.num_layers, model.image_layout())
    fastv = dataclasses.replace(config, methods=("fastv",))
    pairs = eval_lib.build_pairs(fastv, model.num_image_tokens, model.text.num_layers, model.image_layout())
    assert [pair.name for pair in pairs] == [f"none_{model.num_image_tokens}", "fastv_64"]
