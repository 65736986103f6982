"""models/torch_reference.py against transformers' own LLaVA forward, eager attentions and generate()."""

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch

from models.preprocess import Preprocessor, num_image_tokens
from models.presets import llava15_image_processor, llava_config, random_torch_model, tiny_tokenizer
from models.torch_reference import (
    ADAPTPRUNE_DEFAULTS,
    embed_inputs,
    image_token_positions,
    pruned_forward,
    reference_generate,
    reference_select,
)

QUESTION = "Is there a cat in the image? Answer the question using a single word or phrase."


class Case:
    """A tiny random LLaVA with one real photo and prompt, plus its unpruned logits."""

    def __init__(self, preset: str):
        self.config = llava_config(preset)
        self.model = random_torch_model(self.config)
        preprocessor = Preprocessor(
            self.config, tiny_tokenizer(self.config), llava15_image_processor(self.config)
        )
        self.eos_token_id = preprocessor.eos_token_id
        self.pad_token_id = preprocessor.pad_token_id
        self.input_ids = torch.tensor([preprocessor.encode(QUESTION)])
        self.pixel_values = torch.from_numpy(
            preprocessor.pixel_values([PIL.Image.fromarray(skimage.data.chelsea())])
        )
        self.image_positions = image_token_positions(self.input_ids, self.config.image_token_index)
        self.num_image = num_image_tokens(self.config)
        with torch.no_grad():
            self.logits = self.model(input_ids=self.input_ids, pixel_values=self.pixel_values).logits


@pytest.fixture(scope="module", params=["tiny", "tiny-gqa"])
def case(request):
    return Case(request.param)


@pytest.fixture(scope="module")
def tiny():
    return Case("tiny")


def assert_close_relative(actual, expected, rtol=1e-5):
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= rtol * scale, float((actual - expected).abs().max() / scale)


def test_image_span_is_derived_from_the_prompt(tiny):
    assert tiny.image_positions.numel() == tiny.num_image == 576
    first = int(tiny.image_positions[0])
    assert torch.equal(tiny.image_positions, torch.arange(first, first + 576))


def test_unpruned_forward_equals_model_logits(case):
    logits = pruned_forward(case.model, case.input_ids, case.pixel_values, layer=None)
    assert logits.dtype == torch.float32 and logits.shape == case.logits.shape
    assert_close_relative(logits, case.logits)


def test_unpruned_forward_with_cls_token_kept():
    full = Case("tiny-full")  # 577 image tokens, features from the last CLIP layer, tied embeddings
    assert full.image_positions.numel() == 577
    assert_close_relative(
        pruned_forward(full.model, full.input_ids, full.pixel_values, layer=None), full.logits
    )


def test_keeping_every_image_token_equals_unpruned(case):
    logits = pruned_forward(
        case.model, case.input_ids, case.pixel_values, layer=2, kept_image_indices=np.arange(case.num_image)
    )
    assert_close_relative(logits, case.logits)


def test_dropping_half_the_image_tokens(tiny):
    kept = np.arange(0, tiny.num_image, 2)
    logits = pruned_forward(tiny.model, tiny.input_ids, tiny.pixel_values, layer=2, kept_image_indices=kept)
    seq_len = tiny.input_ids.shape[1]
    assert logits.shape == (1, seq_len - tiny.num_image // 2, tiny.config.text_config.vocab_size)
    # Tokens before the image never attend to it: their logits are untouched, row for row.
    first_image = int(tiny.image_positions[0])
    assert_close_relative(logits[:, :first_image], tiny.logits[:, :first_image])
    # The kept image tokens only lose keys from layer 2 on; text after the image sees fewer tokens.
    num_after = seq_len - int(tiny.image_positions[-1]) - 1
    assert (logits[0, -num_after:] - tiny.logits[0, -num_after:]).abs().max() > 1e-4


def test_pruning_before_the_llm_equals_a_short_sequence_at_original_positions(tiny):
    """Layer 0: the model run on the gathered embeddings with gapped position ids (RoPE with gaps).

    The explicit all-ones attention_mask stops transformers from reading the gaps as packed sequences.
    """
    kept = np.arange(3, tiny.num_image, 5)
    logits = pruned_forward(tiny.model, tiny.input_ids, tiny.pixel_values, layer=0, kept_image_indices=kept)
    keep = torch.ones(tiny.input_ids.shape[1], dtype=torch.bool)
    keep[tiny.image_positions] = False
    keep[tiny.image_positions[kept]] = True
    positions = torch.nonzero(keep).squeeze(-1)
    with torch.no_grad():
        embeds = embed_inputs(tiny.model, tiny.input_ids, tiny.pixel_values)[:, positions]
        expected = tiny.model(
            inputs_embeds=embeds,
            position_ids=positions[None],
            attention_mask=torch.ones(1, positions.numel(), dtype=torch.long),
        ).logits
    assert_close_relative(logits, expected)


@pytest.mark.parametrize("layer", [1, 2])
def test_attention_cue_equals_eager_attention_last_row_head_mean(case, layer):
    logits, cues = pruned_forward(
        case.model, case.input_ids, case.pixel_values, layer=layer, return_cues=True
    )
    assert_close_relative(logits, case.logits)
    assert cues.attention.shape == (case.num_image,) and cues.attention.dtype == torch.float32
    assert bool((cues.attention >= 0).all()) and float(cues.attention.sum()) <= 1 + 1e-6
    original_implementation = case.model.config._attn_implementation
    case.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = case.model(
                input_ids=case.input_ids, pixel_values=case.pixel_values, output_attentions=True
            ).attentions
    finally:
        case.model.set_attn_implementation(original_implementation)
    expected = attentions[layer - 1][0, :, -1, case.image_positions].mean(dim=0)
    torch.testing.assert_close(cues.attention, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalize_keys", [False, True])
def test_feature_keys_are_unit_key_projections_of_the_residual_stream(case, normalize_keys):
    layer = 2
    _, cues = pruned_forward(
        case.model,
        case.input_ids,
        case.pixel_values,
        layer=layer,
        return_cues=True,
        normalize_keys=normalize_keys,
    )
    decoder_layer = case.model.model.language_model.layers[layer]
    with torch.no_grad():
        residual = case.model(
            input_ids=case.input_ids, pixel_values=case.pixel_values, output_hidden_states=True
        ).hidden_states[layer][0, case.image_positions]
        if normalize_keys:
            residual = decoder_layer.input_layernorm(residual)
        keys = decoder_layer.self_attn.k_proj(residual)
    text = case.config.text_config
    assert cues.keys.shape == (
        case.num_image,
        text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
    )
    torch.testing.assert_close(cues.keys, keys / keys.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_reference_generate_equals_model_generate(tiny):
    with torch.no_grad():
        expected = tiny.model.generate(
            input_ids=tiny.input_ids,
            pixel_values=tiny.pixel_values,
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tiny.eos_token_id,
            pad_token_id=tiny.pad_token_id,
        )
    tokens = reference_generate(
        tiny.model, tiny.input_ids, tiny.pixel_values, max_new_tokens=10, eos_token_id=tiny.eos_token_id
    )
    assert tokens == expected[0, tiny.input_ids.shape[1] :].tolist()


def test_pruned_generation_starts_from_the_pruned_prefill(tiny):
    kept = np.arange(0, tiny.num_image, 4)
    logits = pruned_forward(tiny.model, tiny.input_ids, tiny.pixel_values, layer=2, kept_image_indices=kept)
    tokens = reference_generate(
        tiny.model,
        tiny.input_ids,
        tiny.pixel_values,
        layer=2,
        kept_image_indices=kept,
        max_new_tokens=3,
        eos_token_id=tiny.eos_token_id,
    )
    assert 1 <= len(tokens) <= 3 and tokens[0] == int(logits[0, -1].argmax())


def test_kept_indices_must_be_ascending_and_in_range(tiny):
    for bad in ([5, 3], [1, 1], [-1, 2], [0, tiny.num_image]):
        with pytest.raises(ValueError, match="strictly ascending"):
            pruned_forward(tiny.model, tiny.input_ids, tiny.pixel_values, layer=2, kept_image_indices=bad)
    with pytest.raises(ValueError, match="layer"):
        pruned_forward(tiny.model, tiny.input_ids, tiny.pixel_values, layer=0, return_cues=True)


# ----------------------------------------------------------------------------- reference_select


def _random_cues(num_tokens=576, dim=64, seed=0):
    generator = np.random.default_rng(seed)
    attention = generator.dirichlet(np.ones(num_tokens)).astype(np.float32)
    keys = generator.standard_normal((num_tokens, dim)).astype(np.float32)
    return attention, keys / np.linalg.norm(keys, axis=-1, keepdims=True)


def _center_prior(grid, sigma=ADAPTPRUNE_DEFAULTS["prior_sigma"]):
    x = np.linspace(-(grid // 2), grid // 2, grid)
    prior = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return (prior / prior.max()).reshape(-1)


@pytest.mark.parametrize("method", ["adaptprune", "fastv", "divprune"])
def test_selection_is_distinct_sorted_int64(method):
    attention, keys = _random_cues()
    kept = reference_select(method, keep=57, attention=attention, keys=keys, embeddings=keys)
    assert kept.dtype == np.int64 and kept.shape == (57,)
    assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < 576


def test_adaptprune_without_a_window_is_topk_of_prior_weighted_attention():
    attention, keys = _random_cues()
    kept = reference_select("adaptprune", keep=64, attention=attention, keys=keys, distance_limit=0.5)
    expected = np.argsort(-(attention * _center_prior(24)), kind="stable")[:64]
    np.testing.assert_array_equal(kept, np.sort(expected))


def test_adaptprune_suppresses_only_similar_neighbours():
    attention, keys = _random_cues(num_tokens=64, dim=32)
    attention = np.full(64, 0.5, np.float32)
    attention[27], attention[28] = 1.0, 0.99  # two adjacent tokens on the 8 x 8 grid lead
    similar = keys.copy()
    similar[28] = similar[27]
    duplicate_kept = reference_select("adaptprune", keep=2, attention=attention, keys=similar)
    distinct_kept = reference_select("adaptprune", keep=2, attention=attention, keys=keys)
    assert 27 in duplicate_kept and 28 not in duplicate_kept  # 0.99 * (1 - 0.80) falls below 0.5
    np.testing.assert_array_equal(distinct_kept, [27, 28])  # dissimilar keys: no suppression


def test_adaptprune_all_zero_scores_still_keep_distinct_tokens():
    _, keys = _random_cues()
    kept = reference_select("adaptprune", keep=10, attention=np.zeros(576, np.float32), keys=keys)
    np.testing.assert_array_equal(kept, np.arange(10))  # ties break by first index, never twice


def test_fastv_is_topk_with_ties_to_the_first_index():
    attention = np.array([0.1, 0.3, 0.3, 0.05, 0.3, 0.2], np.float32)
    np.testing.assert_array_equal(reference_select("fastv", keep=2, attention=attention), [1, 2])
    np.testing.assert_array_equal(reference_select("fastv", keep=4, attention=attention), [1, 2, 4, 5])


def test_divprune_max_min_diversity_by_hand():
    angles = np.deg2rad([0.0, 10.0, 90.0, 180.0])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [3.0], [0.5]])
    # 180 deg has the farthest nearest neighbour (90 deg, distance 1), then 0 deg (distance 2 to it),
    # then 90 deg (distance 1 to the kept set, against 1 - cos 10 deg for 10 deg).
    np.testing.assert_array_equal(reference_select("divprune", keep=1, embeddings=embeddings), [3])
    np.testing.assert_array_equal(reference_select("divprune", keep=3, embeddings=embeddings), [0, 2, 3])
    identical = reference_select("divprune", keep=4, embeddings=np.ones((4, 3)))
    np.testing.assert_array_equal(identical, [0, 1, 2, 3])


def test_reference_select_rejects_what_it_cannot_reference():
    attention, keys = _random_cues()
    for method in ("random", "uniform"):
        with pytest.raises(ValueError, match="no reference selection"):
            reference_select(method, keep=4, attention=attention)
    with pytest.raises(ValueError, match="unknown method"):
        reference_select("tome", keep=4, attention=attention)
    with pytest.raises(ValueError, match="visionzip builds the LLM's image tokens itself.*merged_forward"):
        reference_select("visionzip", keep=4, attention=attention)
    with pytest.raises(ValueError, match="no option"):
        reference_select("fastv", keep=4, attention=attention, distance_limit=3)
    with pytest.raises(ValueError, match="needs keys"):
        reference_select("adaptprune", keep=4, attention=attention)
    with pytest.raises(ValueError, match="keep must be"):
        reference_select("fastv", keep=577, attention=attention)
    with pytest.raises(ValueError, match="square grid"):
        reference_select("adaptprune", keep=4, attention=attention[:575], keys=keys[:575])
