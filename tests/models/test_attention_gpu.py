"""cuDNN's fused attention (`attention='cudnn'`, what `auto` picks on a GPU in bfloat16) against
einsum, on a GPU only: the compiled program really calls cuDNN; in bfloat16 its outputs are within
bf16 noise of einsum's on the vision tower, on the LLM prefill of a small random model (a padded
batch, unpruned and pruned) and on a decode step over a cache; the trained testbed gives the same
greedy answers either way."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adaptprune_jax as prune
from models import layers, presets
from models.checkpoint import load_checkpoint
from models.generate import LlavaRunner
from tests.helpers import make_prompt, random_pixels

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on a GPU only"
)

# Max |cudnn - einsum| over the output's largest magnitude, both in bfloat16: bf16 noise, not a bug
# (a wrong mask or a read padding row moves outputs by their own size).
BF16_TOLERANCE = 2e-2
TESTBED = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "checkpoints", "testbed")


def _relative_error(ours, reference, rows=None) -> float:
    ours, reference = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (ours, reference))
    if rows is not None:
        ours, reference = ours[rows], reference[rows]
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def test_cudnn_is_what_auto_picks_and_what_runs():
    assert layers.resolve_attention("auto", jnp.bfloat16) == "cudnn"
    assert layers.resolve_attention("auto", jnp.float32) == "einsum"
    q = jnp.zeros((1, 100, 4, 64), jnp.bfloat16)
    positions = jnp.arange(100, dtype=jnp.int32)[None]
    compiled = jax.jit(lambda q, p: layers.self_attention(q, q, q, "cudnn", p)).lower(q, positions).compile()
    assert "cudnn" in compiled.as_text()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_equals_einsum_on_random_heads_in_bfloat16(kv_heads):
    """577 tokens with no mask (the vision tower's length, not a multiple of 64), and
    right-padded rows with gaps in their positions (a pruned prefill)."""
    rng = np.random.default_rng(0)
    shape = (3, 577, 4, 64)
    q = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(3, 577, kv_heads, 64)), jnp.bfloat16) for _ in range(2))
    attend = jax.jit(layers.self_attention, static_argnums=3)
    assert _relative_error(attend(q, k, v, "cudnn"), attend(q, k, v, "einsum")) < BF16_TOLERANCE
    positions = np.full((3, 577), -1, np.int32)
    positions[0] = np.arange(577)
    positions[1, :300] = np.sort(rng.choice(1000, 300, replace=False))
    positions[2, :1] = 0
    positions = jnp.asarray(positions)
    cudnn, einsum = attend(q, k, v, "cudnn", positions), attend(q, k, v, "einsum", positions)
    real = np.asarray(positions) >= 0
    assert _relative_error(cudnn, einsum, real) < BF16_TOLERANCE
    assert (np.asarray(cudnn, np.float32)[~real] == 0).all()


@pytest.mark.parametrize("length", [640, 577])
def test_cudnn_reads_keys_with_empty_cache_slots(length):
    """The LLM prefill's shape: queries over keys that hold 32 more (empty) cache slots, a multiple of
    64 or not, on right-padded rows: within bf16 noise of einsum on the prompt's keys alone."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, length + 32, 2, 64)), jnp.bfloat16) for _ in range(2))
    positions = np.full((2, length), -1, np.int32)
    positions[0] = np.arange(length)
    positions[1, :300] = np.arange(300)
    positions = jnp.asarray(positions)
    attend = jax.jit(layers.self_attention, static_argnums=3)
    einsum = attend(q, k[:, :length], v[:, :length], "einsum", positions)
    real = np.asarray(positions) >= 0
    assert _relative_error(attend(q, k, v, "cudnn", positions), einsum, real) < BF16_TOLERANCE


@pytest.mark.parametrize(
    "queries, keys, causal",
    [(640, 672, True), (577, 577, False), (577, 609, True), (2992, 3024, True), (128, 160, True)],
)
def test_cudnn_takes_any_lengths_and_more_keys_than_queries(queries, keys, causal):
    """The kernel itself, called directly: lengths that are not multiples of 64 and keys longer than
    queries (a cache's empty slots) with the causal mask aligned at the first slot, on a right-padded
    batch, within bf16 noise of einsum. What `self_attention` relies on to pass the cache as it is and
    the vision tower's 577 tokens unpadded."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, queries, 4, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, keys, 2, 128)), jnp.bfloat16) for _ in range(2))
    positions = np.full((2, queries), -1, np.int32)
    positions[0] = np.arange(queries)
    positions[1, : queries // 2] = np.arange(queries // 2)
    if not causal:
        positions[1] = np.arange(queries)
    lengths = jnp.asarray((positions >= 0).sum(1), jnp.int32)
    key_positions = jnp.asarray(np.pad(positions, ((0, 0), (0, keys - queries)), constant_values=-1))
    if causal:
        fused = jax.jit(
            lambda q, k, v, n: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n, implementation="cudnn"
            )
        )(q, k, v, lengths)
        reference = layers.attend(q, k, v, layers.attention_mask(jnp.asarray(positions), key_positions))
    else:
        fused = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))(
            q, k, v
        )
        reference = layers.attend(q, k, v, None)
    fused = jnp.asarray(fused).reshape(2, queries, -1)
    assert _relative_error(fused, reference, positions >= 0) < BF16_TOLERANCE


def test_cudnn_sliding_window_equals_einsum_in_bfloat16():
    """Mistral's window on right-padded unpruned rows (positions = slots, some rows longer than the
    window): cuDNN's local window sees the keys the position rule allows, and the window matters."""
    rng = np.random.default_rng(1)
    window, length = 64, 300
    q = jnp.asarray(rng.normal(size=(3, length, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(3, length, 2, 64)), jnp.bfloat16) for _ in range(2))
    positions = np.full((3, length), -1, np.int32)
    for row, real_tokens in enumerate((length, 150, 40)):
        positions[row, :real_tokens] = np.arange(real_tokens)
    positions = jnp.asarray(positions)
    attend = jax.jit(layers.self_attention, static_argnums=(3, 5))
    einsum = attend(q, k, v, "einsum", positions, window)
    real = np.asarray(positions) >= 0
    assert _relative_error(attend(q, k, v, "cudnn", positions, window), einsum, real) < BF16_TOLERANCE
    assert _relative_error(attend(q, k, v, "cudnn", positions, None), einsum, real) > 10 * BF16_TOLERANCE


@pytest.mark.parametrize("window", [None, 50])
def test_cudnn_decode_over_a_cache_equals_einsum_in_bfloat16(window):
    """One new token per row over a cache of 672 slots (the 7B prefill's 640 and 32 decode slots, the
    new one written at slot 650): a full row, a short row (padding inside its cache, before the decoded
    tokens) and a pruned row (gaps in its positions); cuDNN takes the mask as a bias, so it is exact for
    all of them, with a sliding window too."""
    rng = np.random.default_rng(4)
    slots, new_slot = 672, 650
    q = jnp.asarray(rng.normal(size=(3, 1, 8, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(3, slots, 4, 64)), jnp.bfloat16) for _ in range(2))
    positions = np.full((3, slots), -1, np.int32)
    positions[0, :new_slot] = np.arange(new_slot)
    positions[1, :100] = np.arange(100)
    positions[1, 640:new_slot] = np.arange(100, 110)
    positions[2, :200] = np.sort(rng.choice(600, 200, replace=False))
    positions[2, 640:new_slot] = np.arange(600, 610)
    query = np.array([[new_slot - 1], [109], [609]], np.int32)
    mask = layers.attention_mask(jnp.asarray(query), jnp.asarray(positions), window)
    attend = jax.jit(layers.cache_attention, static_argnums=4)
    compiled = attend.lower(q, k, v, mask, "cudnn").compile()
    assert "cudnn" in compiled.as_text()
    assert _relative_error(attend(q, k, v, mask, "cudnn"), attend(q, k, v, mask, "einsum")) < BF16_TOLERANCE


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A small random LLaVA with cuDNN-sized heads (64 wide; grouped-query LLM), loaded in bfloat16
    twice: einsum and cudnn."""
    config = presets.llava_config("tiny")
    config.text_config.hidden_size = 256
    config.text_config.intermediate_size = 512
    config.text_config.num_attention_heads = 4
    config.text_config.num_key_value_heads = 2
    config.vision_config.hidden_size = 128
    config.vision_config.intermediate_size = 256
    config.vision_config.num_attention_heads = 2
    directory = str(tmp_path_factory.mktemp("random-gpu"))
    presets.write_random_checkpoint(config, directory, seed=0)
    models = {
        name: load_checkpoint(directory, dtype="bfloat16", attention=name)[1] for name in ("einsum", "cudnn")
    }
    assert models["cudnn"].config.text.attention == "cudnn"
    return config, models


def test_vision_tower_cudnn_equals_einsum_in_bfloat16(random_pair):
    _, models = random_pair
    pixels = jnp.asarray(
        random_pixels(np.random.default_rng(1), 4, models["einsum"].config.vision.image_size)
    )
    features = {
        name: nnx.jit(lambda m, p: m.image_features(p))(model, pixels) for name, model in models.items()
    }
    assert _relative_error(features["cudnn"], features["einsum"]) < BF16_TOLERANCE


@pytest.mark.parametrize("pruned", [False, True])
def test_llm_prefill_cudnn_equals_einsum_in_bfloat16(random_pair, pruned):
    """Four prompts of different lengths (right padding); pruned: the same fixed kept tokens on both
    sides (a selection from bf16 cues may break near-ties differently), so the compacted sequences
    with gaps in their positions are compared."""
    config, models = random_pair
    cfg = models["einsum"].config
    rng = np.random.default_rng(2)
    prompts = [make_prompt(cfg, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1), (25, 12))]
    pixels = random_pixels(rng, len(prompts), cfg.vision.image_size)
    pruning = None
    if pruned:
        keep = 64
        indices = tuple(sorted(rng.choice(cfg.num_image_tokens, keep, replace=False).tolist()))
        pruning = prune.FixedIndicesConfig(keep=keep, layer=2, indices=indices)
    results = {}
    for name, model in models.items():
        runner = LlavaRunner(model)
        batch = runner.make_batch(prompts, pixels, pad_token_id=config.text_config.pad_token_id)
        results[name] = runner.prefill(batch, pruning=pruning, all_logits=True)
    real = np.asarray(results["einsum"].positions) >= 0
    np.testing.assert_array_equal(
        np.asarray(results["cudnn"].positions), np.asarray(results["einsum"].positions)
    )
    assert _relative_error(results["cudnn"].logits, results["einsum"].logits, real) < BF16_TOLERANCE


@pytest.mark.skipif(not os.path.isfile(os.path.join(TESTBED, "model.safetensors")), reason="no testbed")
def test_testbed_gives_the_same_greedy_answers_with_cudnn_and_einsum(tmp_path):
    import PIL.Image

    from experiments.benchmarks.testbed import normalize_answer
    from experiments.testbed.splits import IMAGES_DIR, write_split
    from models.engine import LlavaEngine

    records = write_split(tmp_path, split="test", num_items=16)
    images = [PIL.Image.open(os.path.join(tmp_path, IMAGES_DIR, r["image"])).convert("RGB") for r in records]
    questions = [r["text"] for r in records]
    engines = {
        name: LlavaEngine.from_checkpoint(TESTBED, dtype="bfloat16", attention=name)
        for name in ("einsum", "auto")
    }
    assert engines["auto"].config.text.attention == "cudnn"
    for pruning in (None, prune.make_config("adaptprune", keep=64)):
        answers = {
            name: engine.answer(images, questions, pruning=pruning, max_new_tokens=4).texts
            for name, engine in engines.items()
        }
        assert answers["auto"] == answers["einsum"], pruning
        correct = sum(
            normalize_answer(a) == normalize_answer(r["answer"]) for a, r in zip(answers["auto"], records)
        )
        assert correct >= len(records) // 2  # the trained model answers, not a degenerate one
