"""SparseVLM inside the Flax LLaVA against its PyTorch reference (written from the released code) on
transformers' LLaVA with the same weights: the kept and merged tokens of every stage, the logits of
the renumbered sequence, greedy decoding that continues each layer's own numbering, the batched
DPC-kNN merge against the released per-row clustering, the schedules and the refused settings."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import adaptprune_jax as prune
from adaptprune_jax.methods.sparsevlm import SparseVLMConfig, dpc_knn_merge, text_raters
from models import torch_reference
from models.generate import SamplingConfig
from tests.helpers import make_prompt, random_cues, random_pixels

MAX_REL_ERR = 1e-5
LAYERS = (0, 1, 2)  # the 4-layer tiny model: pruning on the output of each of its first three layers
SETTINGS = [
    dict(keep=64, layers=LAYERS),  # the released schedule [66, 30, 17] of the budget 64
    dict(schedule=(40, 12, 5), layers=LAYERS),
]


@dataclasses.dataclass(frozen=True)
class RecordingSparseVLM(SparseVLMConfig):
    """SparseVLM that keeps what each stage returned (traced values of the program it runs in)."""

    returned: ClassVar[list] = []

    def select_and_merge(self, cues, keep):
        result = super().select_and_merge(cues, keep)
        self.returned.append(result)
        return result


def _stage_outputs(model, inputs, settings) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kept, merged) of every stage, as SparseVLM returned them inside one jitted prefill (the
    recorded values are outputs of that program; running the model eagerly takes ten times longer)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def stages(state, *inputs):
        RecordingSparseVLM.returned.clear()
        nnx.merge(graphdef, state).prefill(*inputs, extra_slots=0, pruning=RecordingSparseVLM(**settings))
        return [(result.kept, result.merged) for result in RecordingSparseVLM.returned]

    return [(np.asarray(kept), np.asarray(merged)) for kept, merged in stages(state, *inputs)]


def _relative_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("settings", SETTINGS, ids=["released-64", "schedule-40-12-5"])
def test_kept_and_merged_tokens_and_logits_match_the_pytorch_reference(
    tiny_checkpoints, prompt_rng, settings
):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=9, after=17)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("sparsevlm", **settings)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)
    returned = _stage_outputs(ckpt.jax_model, [jnp.asarray(array) for array in batch[:3]], settings)

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    stages = torch_reference.merging_selection(ckpt.torch_model, ids_t, pixels_t, pruning)
    expected = pruning.stages(ckpt.config.num_image_tokens, ckpt.config.text.num_layers)
    assert [(stage.layer, stage.present.numel()) for stage in stages] == list(expected)
    assert len(returned) == len(stages)
    for (kept, merged), reference in zip(returned, stages):
        np.testing.assert_array_equal(kept[0], reference.kept.numpy())
        merged = merged[0]
        assert merged.shape == tuple(reference.merged.shape)
        assert _relative_error(merged, reference.merged.numpy()) <= MAX_REL_ERR
    np.testing.assert_array_equal(np.asarray(result.kept[0]), stages[-1].present.numpy())

    reference = torch_reference.merging_forward(ckpt.torch_model, ids_t, pixels_t, pruning, stages)
    valid = np.asarray(result.positions[0]) >= 0
    np.testing.assert_array_equal(np.asarray(result.positions[0])[valid], np.arange(valid.sum()))
    ours = np.asarray(result.logits[0])[valid]
    assert ours.shape == tuple(reference[0].shape)
    assert _relative_error(ours, reference[0].numpy()) <= MAX_REL_ERR


def test_decoding_continues_each_layers_own_numbering(tiny_checkpoints, prompt_rng):
    """Layer l keeps the whole prompt in its cache, later layers shorter sequences with merged tokens:
    a new token takes each layer's own next position, as rerunning the reference on prompt + tokens
    with the prompt's kept and merged tokens gives."""
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=4, after=12)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("sparsevlm", **SETTINGS[1])
    new_tokens = 8
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id, max_new_tokens=new_tokens)
    ours = ckpt.runner.generate(batch, sampling, pruning=pruning).tokens[0].tolist()

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    stages = torch_reference.merging_selection(ckpt.torch_model, ids_t, pixels_t, pruning)
    reference = torch_reference.merging_generate(
        ckpt.torch_model, ids_t, pixels_t, pruning, stages, max_new_tokens=new_tokens, eos_token_id=-1
    )
    assert ours == reference


@pytest.mark.parametrize("count, clusters", [(40, 5), (83, 9), (16, 2), (5, 1), (12, 12)])
def test_batched_dpc_knn_merge_equals_the_released_clustering_per_row(count, clusters):
    rng = np.random.default_rng(count * 31 + clusters)
    tokens = (rng.normal(size=(3, count, 24)) * rng.uniform(0.5, 3.0, size=(3, count, 1))).astype(np.float32)
    tokens += 5.0  # an offset shared by every token, as the residual stream has
    merged = np.asarray(jax.jit(dpc_knn_merge, static_argnums=1)(jnp.asarray(tokens), clusters))
    assert merged.shape == (3, clusters, 24)
    for row in range(3):
        row_tokens = torch.tensor(tokens[row])
        assignment = SparseVLMConfig.torch_reference_clusters(row_tokens, clusters)
        reference = torch.stack([row_tokens[assignment == c].mean(dim=0) for c in range(clusters)])
        np.testing.assert_allclose(merged[row], reference.numpy(), rtol=0, atol=1e-5)


def test_select_and_merge_on_random_cues_is_per_row():
    layout = prune.grid_layout(6, 6)
    config = prune.make_config("sparsevlm", schedule=(9, 6, 4), layers=LAYERS)
    cues = random_cues(config, batch=4, layout=layout)
    keep = config.stages(36)[0].keep
    run = jax.jit(config.select_and_merge, static_argnums=1)
    kept, merged = run(cues, keep)
    assert kept.shape == (4, 9) and merged.shape == (4, keep - 9, 8)
    assert np.all(np.diff(np.asarray(kept), axis=1) > 0)
    for row in range(4):
        one = jax.tree_util.tree_map(lambda x, row=row: x[row : row + 1] if jnp.ndim(x) else x, cues)
        one_kept, one_merged = run(one.replace(batch_size=1), keep)
        np.testing.assert_array_equal(np.asarray(one_kept[0]), np.asarray(kept[row]))
        np.testing.assert_allclose(np.asarray(one_merged[0]), np.asarray(merged[row]), rtol=0, atol=1e-6)


def test_raters_are_the_text_tokens_above_the_average_or_all_of_them():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(2, 12, 8)).astype(np.float32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12)).copy()
    positions[1, 10:] = -1  # the second prompt: one text token after its image, then padding
    image_slots = np.broadcast_to(np.arange(2, 9, dtype=np.int32), (2, 7)).copy()
    origin = positions.copy()
    raters = np.asarray(text_raters(prune.InputEmbeddingsArrays(embeddings, positions, image_slots, origin)))
    image, text = embeddings[0, 2:9], embeddings[0, 9:]
    relevance = torch.tensor(image @ text.T).softmax(dim=1).mean(dim=0).numpy()
    np.testing.assert_array_equal(raters[0], np.r_[np.zeros(9, bool), relevance > relevance.mean()])
    np.testing.assert_array_equal(raters[1], np.arange(12) == 9)  # one text token: it rates


def test_released_schedules_and_refused_settings():
    for budget, stages, average in (
        (192, ((3, 309), (7, 204), (16, 113)), 192.03125),
        (128, ((3, 312), (7, 117), (16, 39)), 128.625),
        (64, ((3, 82), (7, 32), (16, 18)), 64.8125),
    ):
        config = prune.make_config("sparsevlm", keep=budget)
        assert config.stages(576, 32) == stages and config.resolve_keep(576) == stages[-1][1]
        assert config.equivalent_tokens(576, 32) == average  # the released log's "equal token num"
        config.validate(576, 32)
        config.validate(576, 17)  # the released layers fit any LLM of 17 layers or more
    with pytest.raises(ValueError, match=r"no released schedule for keep=96: the released budgets are 192"):
        prune.make_config("sparsevlm", keep=96)
    with pytest.raises(ValueError, match=r"schedule \(20, 10\) has 2 entries for the 3 pruning layers"):
        prune.make_config("sparsevlm", schedule=(20, 10))
    with pytest.raises(ValueError, match=r"schedule values must be >= 1"):
        prune.make_config("sparsevlm", schedule=(20, 0, 5))
    with pytest.raises(ValueError, match=r"layers must increase from >= 0"):
        prune.make_config("sparsevlm", layers=(2, 2, 5))
    with pytest.raises(ValueError, match=r"needs an LLM of at least 17 layers; this one has 4: give layers="):
        prune.make_config("sparsevlm", keep=64).validate(576, 4)
    with pytest.raises(ValueError, match=r"reach past the LLM's 4 layers: pruning on layer l's output needs"):
        prune.make_config("sparsevlm", keep=64, layers=(0, 1, 3)).validate(576, 4)


@dataclasses.dataclass(frozen=True)
class MergingInOriginalPositions(SparseVLMConfig):
    renumber_positions: ClassVar[bool] = False


def test_a_merging_method_must_renumber(tiny_checkpoints, prompt_rng):
    config = MergingInOriginalPositions(keep=64, layers=LAYERS)
    with pytest.raises(ValueError, match=r"merges tokens inside the LLM, which needs renumber_positions"):
        config.validate(576, 4)
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=3, after=5)
    batch = ckpt.runner.make_batch(
        [ids], random_pixels(prompt_rng, 1, ckpt.config.vision.image_size), pad_token_id=ckpt.pad_token_id
    )
    with pytest.raises(ValueError, match=r"which needs renumber_positions"):
        ckpt.jax_model.prefill(*(jnp.asarray(array) for array in batch[:3]), extra_slots=0, pruning=config)
