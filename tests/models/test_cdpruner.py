"""CDPruner's batched library selection against its PyTorch reference (written from the released
code) on random cues, index for index; inside the Flax LLaVA with a CLIP text tower against the
reference on transformers' models (kept tokens and logits); keeping all; the settings, cues and
missing text tower it refuses."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import adaptprune_jax as prune
from adaptprune_jax.methods import cdpruner
from models import torch_reference
from tests.helpers import batch_for, make_prompt, make_queries, random_pixels

NUM_TOKENS, JOINT_WIDTH, LLM_WIDTH, SEGMENTS = 48, 16, 64, 3
MAX_REL_ERR = 1e-5
_select = jax.jit(lambda config, cues, keep: config.select(cues, keep), static_argnums=(0, 2))


def _cues(batch: int, seed: int, *, width: int = LLM_WIDTH, duplicates: int = 6) -> prune.Cues:
    """Random cues; each row's last ``duplicates`` features are near-copies (1e-2 noise) of others,
    and the rows' questions take 1..SEGMENTS text segments."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, NUM_TOKENS, width)).astype(np.float32)
    copied = rng.integers(0, NUM_TOKENS - duplicates, (batch, duplicates))
    noise = 1e-2 * rng.normal(size=(batch, duplicates, width))
    features[:, NUM_TOKENS - duplicates :] = np.take_along_axis(features, copied[..., None], axis=1) + noise
    segments = 1 + np.arange(batch) % SEGMENTS
    return prune.Cues(
        image_embeds=rng.normal(size=(batch, NUM_TOKENS, JOINT_WIDTH)).astype(np.float32),
        text_embeds=rng.normal(size=(batch, SEGMENTS, JOINT_WIDTH)).astype(np.float32),
        text_mask=np.arange(SEGMENTS)[None] < segments[:, None],
        embeddings=features,
    )


def _reference(cues: prune.Cues, keep: int) -> np.ndarray:
    rows = []
    for row in range(cues.embeddings.shape[0]):
        rows.append(
            torch_reference.reference_select(
                "cdpruner",
                keep=keep,
                image_embeds=cues.image_embeds[row],
                text_embeds=cues.text_embeds[row][cues.text_mask[row]],  # the row's own segments
                embeddings=cues.embeddings[row],
            )
        )
    return np.stack(rows)


def test_the_unnegated_ablation_reverses_the_relevance():
    """negate_relevance=False (ours) is the released min-max of the cosine itself: per token the two
    relevances sum to 1 + 2e-6 / span."""
    cues = _cues(batch=3, seed=4)
    released = np.asarray(cdpruner.query_relevance(cues.image_embeds, cues.text_embeds, cues.text_mask))
    unnegated = np.asarray(
        cdpruner.query_relevance(cues.image_embeds, cues.text_embeds, cues.text_mask, negate=False)
    )
    np.testing.assert_allclose(released + unnegated, 1.0, atol=1e-5)
    assert np.corrcoef(released[0], unnegated[0])[0, 1] < -0.999
    config = prune.CDPrunerConfig(keep=8, negate_relevance=False)
    assert not np.array_equal(np.asarray(_select(config, cues, 8)), _reference(cues, 8))
    with pytest.raises(ValueError, match="negate_relevance must be a bool"):
        prune.CDPrunerConfig(keep=8, negate_relevance=1)


@pytest.mark.parametrize("keep", [8, 24])
def test_batched_selection_equals_the_reference(keep):
    cues = _cues(batch=6, seed=keep)
    config = prune.CDPrunerConfig(keep=keep)
    kept = np.asarray(_select(config, cues, keep))
    assert kept.dtype == np.int32 and kept.shape == (6, keep)
    np.testing.assert_array_equal(kept, _reference(cues, keep))


def test_relevance_is_normalised_per_row():
    """The released min-max runs over the whole batch tensor; here each row spans [1e-6, 1] alone
    (up to 1e-6), so a row's selection does not depend on the rows batched with it."""
    cues = _cues(batch=4, seed=3)
    relevance = np.asarray(cdpruner.query_relevance(cues.image_embeds, cues.text_embeds, cues.text_mask))
    np.testing.assert_allclose(relevance.min(axis=1), 0, atol=2e-6)
    np.testing.assert_allclose(relevance.max(axis=1), 1, atol=2e-6)
    config = prune.CDPrunerConfig(keep=8)
    batched = np.asarray(_select(config, cues, 8))
    for row in range(4):
        one = jax.tree_util.tree_map(lambda x, row=row: x[row : row + 1], cues)
        np.testing.assert_array_equal(np.asarray(_select(config, one, 8))[0], batched[row])


@pytest.mark.parametrize("width", [LLM_WIDTH, 8])
def test_keeping_every_token_keeps_every_token(width):
    """Also past the kernel's rank (features 8 wide), where only round-off is left to pick by."""
    cues = _cues(batch=3, seed=1, width=width)
    kept = np.asarray(_select(prune.CDPrunerConfig(keep=1.0), cues, NUM_TOKENS))
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(NUM_TOKENS), (3, NUM_TOKENS)))


def test_past_the_rank_the_picks_follow_relevance():
    """Features 8 wide span the kernel in 8 picks; the rest are the most relevant of the others."""
    cues = _cues(batch=2, seed=5, width=8, duplicates=0)
    keep, rank = 20, 8
    relevance = np.asarray(cdpruner.query_relevance(cues.image_embeds, cues.text_embeds, cues.text_mask))
    order = np.asarray(
        cdpruner.greedy_dpp_order(cdpruner.conditional_kernel(cues.embeddings, relevance), keep)
    )
    for row in range(2):
        rest = [i for i in np.argsort(-relevance[row], kind="stable") if i not in order[row, :rank]]
        assert order[row, rank:].tolist() == rest[: keep - rank]


def test_refuses_keep_out_of_range_and_missing_cues():
    cues = _cues(batch=2, seed=0)
    config = prune.CDPrunerConfig(keep=8)
    for keep in (0, NUM_TOKENS + 1):
        with pytest.raises(ValueError, match=rf"cdpruner: keep={keep} is outside 1\.\.{NUM_TOKENS}"):
            config.select(cues, keep)
    for field in ("image_embeds", "text_embeds", "text_mask", "embeddings"):
        with pytest.raises(ValueError, match=rf"cdpruner needs cues\.{field}, which is None"):
            config.select(cues.replace(**{field: None}), 8)
    with pytest.raises(ValueError, match="keep=600 exceeds num_image_tokens=576"):
        prune.CDPrunerConfig(keep=600).resolve_keep(576)
    with pytest.raises(ValueError, match="keep must be in"):
        torch_reference.reference_select(
            "cdpruner",
            keep=0,
            image_embeds=cues.image_embeds[0],
            text_embeds=cues.text_embeds[0],
            embeddings=cues.embeddings[0],
        )


@pytest.mark.parametrize("keep", [16, 48])
def test_in_the_model_it_keeps_what_the_reference_keeps(tiny_checkpoints, prompt_rng, keep):
    """The Flax LLaVA with the tiny CLIP's text tower against the reference on transformers' LLaVA
    and CLIP (its text and vision-with-projection models, as released) with the same weights: the
    kept tokens, index for index, and the logits of the shorter prompt. The question spans two text
    segments. (Budgets below the 128-wide features' rank: past it the released picks are NaN.)"""
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=6, after=14)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    (query,) = make_queries(ckpt, prompt_rng, [20])
    pruning = prune.CDPrunerConfig(keep=keep)
    result = ckpt.runner.prefill(
        batch_for(ckpt, [ids], pixels, pruning, queries=[query]), pruning=pruning, all_logits=True
    )
    kept = np.array(result.kept[0])

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    cues = torch_reference.joint_reference_cues(
        ckpt.torch_model, ckpt.clip_directory, ids_t, pixels_t, query, cdpruner.FEATURE_LAYER
    )
    assert cues["text_embeds"].shape[0] == 2
    np.testing.assert_array_equal(kept, torch_reference.reference_select("cdpruner", keep=keep, **cues))
    reference = torch_reference.pruned_forward(
        ckpt.torch_model, ids_t, pixels_t, layer=0, kept_image_indices=kept, renumber_positions=True
    )[0].numpy()
    ours = np.asarray(result.logits[0])[np.asarray(result.positions[0]) >= 0]
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_the_model_refuses_it_without_the_text_tower_or_the_questions(tiny_checkpoints):
    from models.generate import LlavaRunner
    from models.llava import LlavaForConditionalGeneration

    ckpt = tiny_checkpoints("tiny")
    rng = np.random.default_rng(0)
    prompts, pixels = (
        [make_prompt(ckpt.config, rng, 2, 3)],
        random_pixels(rng, 1, ckpt.config.vision.image_size),
    )
    pruning = prune.CDPrunerConfig(keep=8)
    batch = ckpt.runner.make_batch(prompts, pixels, pad_token_id=ckpt.pad_token_id)
    with pytest.raises(
        ValueError, match=r"cdpruner reads each question through CLIP's text tower: .*queries="
    ):
        ckpt.runner.prefill(batch, pruning=pruning)
    without = LlavaRunner(LlavaForConditionalGeneration(ckpt.config))
    with pytest.raises(
        ValueError, match="queries need the CLIP text tower, which this model was loaded without"
    ):
        without.make_batch(prompts, pixels, pad_token_id=ckpt.pad_token_id, queries=[[1, 2]])
    with pytest.raises(
        ValueError, match="cdpruner needs the CLIP text tower and visual_projection, which llava"
    ):
        without.prefill(batch, pruning=pruning)
