"""LLaVA-NeXT (anyres) against transformers' LlavaNextForConditionalGeneration (float32, CPU).

One batch of four images of different aspect ratios, so different crop counts (padded crops) and
image-token counts (padded image slots), over a tiny LLaMA and a tiny Mistral whose 64-position
sliding window every prompt passes: the processor's prompts and crops, the packed image features,
the logits, greedy generation, and the batch against its rows one by one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

from models import anyres
from models.generate import SamplingConfig
from models.preprocess import Preprocessor, build_prompt
from tests.models.test_model_parity import MAX_REL_ERR, max_rel_err

SIZES = ((480, 640), (1000, 300), (672, 672), (336, 336))  # (height, width)
PRESETS = ("tiny-next", "tiny-next-mistral")
NEW_TOKENS = 20
QUESTIONS = (
    "is there a cat in the image",
    "what color is the car on the left of the picture",
    "how many birds are above the dog",
    "describe this scene please tell me more about the person on the right",
)


@dataclasses.dataclass
class NextBatch:
    ckpt: object
    preprocessor: Preprocessor
    images: list
    prompts: list
    batch: object
    prefill: object  # the batched prefill's result, every position's logits


@pytest.fixture(scope="module", params=PRESETS)
def next_batch(request, tiny_checkpoints):
    ckpt = tiny_checkpoints(request.param)
    preprocessor = Preprocessor.from_checkpoint(ckpt.directory)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    sizes = preprocessor.image_sizes(images)
    prompts = [preprocessor.encode(question, size) for question, size in zip(QUESTIONS, sizes)]
    batch = ckpt.runner.make_batch(
        prompts,
        preprocessor.pixel_values(images),
        pad_token_id=ckpt.pad_token_id,
        max_new_tokens=NEW_TOKENS,
        image_sizes=sizes,
    )
    prefill = ckpt.runner.prefill(batch, extra_slots=NEW_TOKENS, all_logits=True)
    return NextBatch(ckpt, preprocessor, images, prompts, batch, prefill)


def last_logits(prefill, lengths) -> np.ndarray:
    """(B, V) logits of each row's last prompt token, from an all-positions prefill."""
    return np.asarray(prefill.logits)[np.arange(len(lengths)), np.asarray(lengths) - 1]


def _row_inputs(next_batch, row):
    ckpt, batch = next_batch.ckpt, next_batch.batch
    size = next_batch.preprocessor.image_sizes(next_batch.images[row : row + 1])
    crops = anyres.num_crops(size[0], ckpt.config)
    return dict(
        input_ids=torch.tensor([next_batch.prompts[row]]),
        pixel_values=torch.tensor(batch.pixel_values[row : row + 1, :crops]),
        image_sizes=torch.tensor(size),
    )


def test_prompts_and_crops_equal_transformers_processor(next_batch):
    """Each row's `<image>` expands to its own image's count, and the crops are the processor's
    (zero crops pad rows with fewer); the packing's counts agree."""
    from transformers import LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(next_batch.ckpt.directory)
    model_type = next_batch.ckpt.hf_config.text_config.model_type
    texts = [build_prompt(question, model_type) for question in QUESTIONS]
    reference = processor(images=next_batch.images, text=texts, return_tensors="np", padding=True)
    batch = next_batch.batch
    counts = np.asarray(batch.image_layout.valid).sum(axis=1)
    for row, ids in enumerate(next_batch.prompts):
        expected = reference["input_ids"][row][reference["attention_mask"][row] > 0].tolist()
        assert ids == expected
        assert counts[row] == ids.count(next_batch.ckpt.config.image_token_index)
    assert sorted(set(counts.tolist())) == sorted({2340, 2232, 2928, 1176})
    crops = reference["pixel_values"].shape[1]
    np.testing.assert_array_equal(batch.pixel_values[:, :crops], reference["pixel_values"])
    assert not batch.pixel_values[:, crops:].any()
    for row, size in enumerate(reference["image_sizes"]):
        assert not batch.pixel_values[row, anyres.num_crops(size, next_batch.ckpt.config) :].any()


def test_packed_features_equal_transformers_pack_image_features(next_batch):
    """The one gather over the batch's crop features gives each image exactly transformers' packed
    features (base grid, unpadded high-resolution grid, newlines), padded slots marked invalid."""
    ckpt, batch = next_batch.ckpt, next_batch.batch
    ours = np.asarray(
        jax.jit(lambda model, pixels, index: model.packed_features(pixels, index))(
            ckpt.jax_model, jnp.asarray(batch.pixel_values), jnp.asarray(batch.image_index)
        )
    )
    layout = batch.image_layout
    for row in range(len(SIZES)):
        with torch.no_grad():
            inputs = _row_inputs(next_batch, row)
            reference = ckpt.torch_model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output[0]
        count = int(np.asarray(layout.valid[row]).sum())
        assert count == reference.shape[0]
        assert max_rel_err(ours[row, :count], reference.numpy()) <= MAX_REL_ERR
        grid = np.asarray(layout.grid[row, :count])
        newline = np.flatnonzero(grid == -1)
        high_rows = int(np.asarray(layout.grid_rows[row, :count])[grid == 1][0])
        assert (grid[: ckpt.config.features_per_crop] == 0).all() and len(newline) == high_rows
        np.testing.assert_array_equal(
            ours[row, newline], np.broadcast_to(ours[row, newline[0]], ours[row, newline].shape)
        )


def test_logits_equal_transformers(next_batch):
    ckpt = next_batch.ckpt
    for row, ids in enumerate(next_batch.prompts):
        with torch.no_grad():
            reference = ckpt.torch_model(**_row_inputs(next_batch, row)).logits[0].numpy()
        ours = np.asarray(next_batch.prefill.logits)[row, : len(ids)]
        assert max_rel_err(ours, reference) <= MAX_REL_ERR
        assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_greedy_generation_equals_transformers_generate(next_batch):
    """Greedy decoding from the batched prefill (the decode loop `generate` runs, fed the prefill the
    other tests read, so the expensive 3,000-token prefill runs once) equals transformers' per row.
    Mistral's: its decode steps apply the window (LLaMA's decoding is LLaVA-1.5's, tested there)."""
    if next_batch.ckpt.name != "tiny-next-mistral":
        pytest.skip("the windowed decode is what is new; LLaMA's decode is covered by LLaVA-1.5's tests")
    ckpt, runner, prefill = next_batch.ckpt, next_batch.ckpt.runner, next_batch.prefill
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    first = jnp.asarray(last_logits(prefill, next_batch.batch.lengths))
    tokens, counts, _ = runner.decode_loop(
        runner.weights, first, prefill.caches, prefill.next_positions, jax.random.key(0), sampling=sampling
    )
    assert (np.asarray(counts) == NEW_TOKENS).all()
    for row, ids in enumerate(next_batch.prompts):
        with torch.no_grad():
            reference = ckpt.torch_model.generate(
                **_row_inputs(next_batch, row),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=ckpt.pad_token_id,
            )
        assert np.asarray(tokens)[row].tolist() == reference[0, len(ids) :].tolist()


def test_batch_equals_rows_one_by_one(next_batch):
    """Each row alone (its own crop count padded, its own image-slot bucket and prompt width) gives the
    batch's next-token logits: padded crops, padded image slots and the other rows change nothing."""
    if next_batch.ckpt.name != "tiny-next-mistral":
        pytest.skip("one preset suffices: the row-by-row prefills compile once per row")
    ckpt, batch = next_batch.ckpt, next_batch.batch
    batched = last_logits(next_batch.prefill, batch.lengths)
    for row in (1, 3):  # the rows with padded crops (4 and 3 of 5) and the most padded image slots
        ids = next_batch.prompts[row]
        single = ckpt.runner.make_batch(
            [ids],
            batch.pixel_values[row : row + 1],
            pad_token_id=ckpt.pad_token_id,
            image_sizes=next_batch.preprocessor.image_sizes(next_batch.images[row : row + 1]),
        )
        assert single.image_layout.num_tokens < batch.image_layout.num_tokens
        alone = np.asarray(ckpt.runner.prefill(single).logits)[0]
        np.testing.assert_allclose(batched[row], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_sliding_window_rule_equals_transformers_and_the_fused_xla_call():
    """The window's off-by-one is transformers' (`kv > q - W`, read from its mask function), and the
    fused call's local window gives einsum's attention on right-padded rows (positions = slots)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from models.layers import attention_mask, self_attention

    window, length = 5, 12
    rule = sliding_window_causal_mask_function(window)
    index = torch.arange(length)
    expected = rule(0, 0, index[:, None], index[None, :]).numpy()
    positions = jnp.arange(length)[None]
    np.testing.assert_array_equal(np.asarray(attention_mask(positions, positions, window))[0], expected)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, length, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, length, 2, 8)), jnp.float32) for _ in range(2))
    padded = jnp.where(jnp.arange(length)[None] < jnp.array([[length], [7]]), jnp.arange(length)[None], -1)
    exact = np.asarray(self_attention(q, k, v, "einsum", padded, window))
    fused = np.asarray(self_attention(q, k, v, "xla", padded, window))
    real = np.asarray(padded) >= 0
    np.testing.assert_allclose(fused[real], exact[real], rtol=1e-6, atol=1e-6)
    assert not np.allclose(exact, np.asarray(self_attention(q, k, v, "einsum", padded)))  # the window bites


def test_anyres_refuses_what_it_cannot_run(next_batch):
    """A keep ratio (rows differ in count), a keep above a row's count, and a method reading the vision
    tower per crop are refused by name, before anything runs."""
    import adaptprune_jax as prune

    if next_batch.ckpt.name != "tiny-next":
        pytest.skip("checks of the host side, once")
    runner, layout = next_batch.ckpt.runner, next_batch.batch.image_layout
    with pytest.raises(ValueError, match="keep=0.25 is a ratio"):
        runner.resolve_keep(prune.make_config("fastv", keep=0.25), layout)
    with pytest.raises(ValueError, match="keep=2000 exceeds the 1176 image tokens of row 3"):
        runner.resolve_keep(prune.make_config("fastv", keep=2000), layout)
    with pytest.raises(ValueError, match="visionzip reads the vision tower per crop"):
        runner.resolve_keep(prune.make_config("visionzip", keep=64), layout)
    assert runner.resolve_keep(prune.make_config("fastv", keep=64), layout) == 64


def test_unsupported_variants_are_refused_by_name():
    from transformers import LlavaNextConfig, Qwen2Config

    from models import presets
    from models.config import from_hf_config

    config = presets.llava_config("tiny-next")
    qwen = LlavaNextConfig(vision_config=config.vision_config, text_config=Qwen2Config(hidden_size=64))
    with pytest.raises(
        ValueError, match=r"unsupported language model type 'qwen2'; supported: llama, mistral"
    ):
        from_hf_config(qwen)
    full = LlavaNextConfig(
        vision_config=config.vision_config,
        text_config=config.text_config,
        vision_feature_select_strategy="full",
    )
    with pytest.raises(ValueError, match="'full' for llava_next; supported: default"):
        from_hf_config(full)
    odd = LlavaNextConfig(
        vision_config=config.vision_config, text_config=config.text_config, image_grid_pinpoints=[[336, 500]]
    )
    with pytest.raises(ValueError, match=r"\[336, 500\] must be \(height, width\), both positive multiples"):
        from_hf_config(odd)


@pytest.mark.slow
def test_validate_cli_compares_a_llava_next_checkpoint_with_transformers(tiny_checkpoints, tmp_path):
    """experiments.validate on a LLaVA-NeXT checkpoint: the image's crops and size reach both sides
    (LlavaNextForConditionalGeneration), logits and greedy tokens agree; pruning is refused by name."""
    from experiments.validate import ValidateConfig, run

    checkpoint = tiny_checkpoints("tiny-next")
    image = tmp_path / "wide.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 500, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(image)
    settings = ValidateConfig(checkpoint=checkpoint.directory, image=str(image), generate_tokens=3)
    report = run(settings)
    assert report["image_tokens"] == anyres.image_token_count((200, 500), checkpoint.config)
    assert report["passed"] and report["generated_equal"], report
    assert report["jax_vs_torch_fp32"]["max_rel_err"] <= MAX_REL_ERR
    with pytest.raises(ValueError, match="--method=fastv on a LLaVA-NeXT model"):
        run(dataclasses.replace(settings, method="fastv", keep="64"))
