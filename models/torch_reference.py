"""The PyTorch side of cross-framework validation: in-LLM visual-token pruning on transformers' LLaVA.

The JAX model and pruning library are validated against this module, which is deliberately small and
built from transformers' own modules (`LlavaForConditionalGeneration`, its decoder layers, rotary
embedding, eager attention function), so a disagreement points at the JAX side or at a documented
difference, never at a second reimplementation of LLaMA.

Pruning (see docs/algorithm.md): decoder layers 0..K-1 see every token; then only the text tokens and
the kept image tokens continue through layers K..L-1, each keeping its ORIGINAL position id (RoPE
positions with gaps) and attending causally by original position. The two AdaptPrune cues are
computed as the released code computes them, and `reference_select` re-implements the released
selection loops in torch. Batch 1 only: the JAX side owns batching.

Everything runs in the model's dtype (float32 for validation) with TF32 disabled, because the cosine
similarities in the NMS amplify rounding error and reduced-precision matmuls flip selections.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from adaptprune_jax import AdaptPruneConfig, PruneConfig

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _released_defaults(config_class) -> dict:
    """A method's settings that its reference takes, at their defaults (the released code's)."""
    return {name: getattr(config_class(), name) for name in config_class.reference_options}


ADAPTPRUNE_DEFAULTS = _released_defaults(AdaptPruneConfig)


@dataclass(frozen=True)
class PruningCues:
    """AdaptPrune's per-image-token cues, in image-span order (float32, on the model's device).

    attention: (N,) head-mean attention of the last prompt token at layer K-1 over the image tokens.
    keys: (N, num_key_value_heads * head_dim) L2-normalised layer-K key projections.
    """

    attention: torch.Tensor
    keys: torch.Tensor


def image_token_positions(input_ids: torch.Tensor, image_token_index: int) -> torch.Tensor:
    """Sequence positions (ascending, int64) of the image placeholder tokens of a batch-1 prompt."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"the torch reference handles batch 1; got input_ids of shape {tuple(input_ids.shape)}"
        )
    positions = torch.nonzero(input_ids[0] == image_token_index).squeeze(-1)
    if positions.numel() == 0:
        raise ValueError(f"input_ids hold no image token (id {image_token_index})")
    return positions


@torch.no_grad()
def embed_inputs(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Input embeddings with the projected image features scattered into the image positions.

    Exactly transformers' own path (LlavaModel.forward): token embeddings, vision tower features
    selected by the config's layer and strategy, projector (LLaVA-NeXT: packed by ``image_sizes``),
    then masked_scatter in sequence order.
    """
    llava = model.model
    inputs_embeds = llava.get_input_embeddings()(input_ids)
    sizes = {} if image_sizes is None else {"image_sizes": image_sizes}
    features = llava.get_image_features(pixel_values=pixel_values, return_dict=True, **sizes).pooler_output
    features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
    image_mask = llava.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
    return inputs_embeds.masked_scatter(image_mask, features)


def causal_mask_by_position(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, S, S) additive mask: 0 where key position <= query position, else dtype's minimum.

    An explicit 4D float mask is what both transformers' eager (added to the scores) and sdpa (passed
    as attn_mask) attention take. Using torch.finfo(dtype).min rather than -inf matches transformers'
    eager_mask. Never rely on transformers building the mask from gapped position_ids: without an
    attention_mask it reads any position gap as the start of a new packed sequence.
    """
    allowed = positions[:, None, None, :] <= positions[:, None, :, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _run_layers(language_model, hidden: torch.Tensor, positions: torch.Tensor, layers) -> torch.Tensor:
    """Apply decoder `layers` to `hidden`, whose tokens sit at (possibly gapped) `positions`."""
    if len(layers) == 0:
        return hidden
    mask = causal_mask_by_position(positions, hidden.dtype)
    position_embeddings = language_model.rotary_emb(hidden, position_ids=positions)
    for decoder_layer in layers:
        hidden = decoder_layer(
            hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings
        )
    return hidden


def _last_token_attention(
    language_model,
    decoder_layer,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    image_positions: torch.Tensor,
) -> torch.Tensor:
    """Head-mean attention probabilities of the last token over the image tokens at `decoder_layer`.

    The released code re-runs the layer in eager mode with output_attentions and reads the last row;
    this computes only that row, with the layer's own projections, rotary embedding and transformers'
    eager attention function (softmax over all causal keys, in float32, cast to the model dtype).
    """
    attention = decoder_layer.self_attn

    def split_heads(projected: torch.Tensor) -> torch.Tensor:  # (1, T, H*d) -> (1, H, T, d)
        return projected.view(1, projected.shape[1], -1, attention.head_dim).transpose(1, 2)

    normed = decoder_layer.input_layernorm(hidden)
    query = split_heads(attention.q_proj(normed[:, -1:]))
    key = split_heads(attention.k_proj(normed))
    value = split_heads(attention.v_proj(normed))
    cos, sin = language_model.rotary_emb(hidden, position_ids=positions)
    query = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])[0]
    key = apply_rotary_pos_emb(key, key, cos, sin)[1]
    last_row_mask = causal_mask_by_position(positions, hidden.dtype)[:, :, -1:, :]
    _, probabilities = eager_attention_forward(
        attention, query, key, value, last_row_mask, scaling=attention.scaling
    )
    return probabilities[0, :, 0, image_positions].float().mean(dim=0)


def _feature_keys(decoder_layer, image_hidden: torch.Tensor, normalize_keys: bool) -> torch.Tensor:
    """L2-normalised key projections of the image tokens' residual stream at `decoder_layer`.

    QUIRK of the released code: k_proj is applied to the raw residual stream (no input RMSNorm, no
    RoPE); normalize_keys=True applies the layer's input_layernorm first, as the layer itself does.
    """
    if normalize_keys:
        image_hidden = decoder_layer.input_layernorm(image_hidden)
    return F.normalize(decoder_layer.self_attn.k_proj(image_hidden).float(), dim=-1)


def _kept_sequence_positions(seq_len: int, image_positions: torch.Tensor, kept_image_indices) -> torch.Tensor:
    """Ascending sequence positions of the text tokens plus the kept image tokens."""
    kept = torch.as_tensor(kept_image_indices).long().reshape(-1).to(image_positions.device)
    num_image = image_positions.numel()
    if kept.numel() and (kept[0] < 0 or kept[-1] >= num_image or bool((kept[1:] <= kept[:-1]).any())):
        raise ValueError(
            f"kept_image_indices must be strictly ascending indices in [0, {num_image}); got {kept.tolist()}"
        )
    keep = torch.ones(seq_len, dtype=torch.bool, device=image_positions.device)
    keep[image_positions] = False
    keep[image_positions[kept]] = True
    return torch.nonzero(keep).squeeze(-1)


def _decoder_forward(
    model,
    inputs_embeds: torch.Tensor,
    image_positions: torch.Tensor,
    *,
    layer: int | None,
    kept_image_indices,
    return_cues: bool,
    normalize_keys: bool,
    renumber_positions: bool = False,
):
    """Logits (1, S', V) float32 and optionally the cues, from already merged input embeddings."""
    language_model = model.model.language_model
    layers = language_model.layers
    implementation = language_model.config._attn_implementation
    if implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"the 4D additive mask needs eager or sdpa attention, the model uses {implementation!r}"
        )
    if layer is None:
        if kept_image_indices is not None or return_cues:
            raise ValueError("pruning and cues need the pruning layer K (layer=...)")
        layer = len(layers)
    if not 0 <= layer <= len(layers):
        raise ValueError(f"layer must be in [0, {len(layers)}], got {layer}")
    if return_cues and not 1 <= layer < len(layers):
        raise ValueError(
            f"cues read layers K-1 and K, so layer must be in [1, {len(layers) - 1}], got {layer}"
        )

    positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
    hidden = inputs_embeds
    cues = None
    if return_cues:
        hidden = _run_layers(language_model, hidden, positions, layers[: layer - 1])
        attention = _last_token_attention(
            language_model, layers[layer - 1], hidden, positions, image_positions
        )
        hidden = _run_layers(language_model, hidden, positions, layers[layer - 1 : layer])
        cues = PruningCues(
            attention=attention, keys=_feature_keys(layers[layer], hidden[0, image_positions], normalize_keys)
        )
    else:
        hidden = _run_layers(language_model, hidden, positions, layers[:layer])

    if kept_image_indices is not None:
        sequence_kept = _kept_sequence_positions(hidden.shape[1], image_positions, kept_image_indices)
        hidden, positions = hidden[:, sequence_kept], positions[:, sequence_kept]
        if renumber_positions:  # DivPrune as released: features cut before the sequence is built
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    hidden = _run_layers(language_model, hidden, positions, layers[layer:])
    logits = model.lm_head(language_model.norm(hidden)).float()
    return logits, cues


@torch.no_grad()
def pruned_forward(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    layer: int | None,
    kept_image_indices=None,
    return_cues: bool = False,
    normalize_keys: bool = False,
    renumber_positions: bool = False,
    inputs_embeds: torch.Tensor | None = None,
):
    """Prefill logits (1, S', V) float32 with the image tokens pruned after decoder layer `layer` - 1.

    kept_image_indices: ascending indices into the image span (None keeps every token, and then the
    result equals `model(input_ids=..., pixel_values=...).logits`). S' = text tokens + kept tokens.
    return_cues=True returns (logits, PruningCues): the cues read the unpruned prefix, so they can be
    computed with kept_image_indices=None and fed to `reference_select`. inputs_embeds: the merged
    prompt embeddings, when already built (``merged_embeds``); default: transformers' own.
    """
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    if inputs_embeds is None:
        inputs_embeds = embed_inputs(model, input_ids, pixel_values)
    logits, cues = _decoder_forward(
        model,
        inputs_embeds,
        image_positions,
        layer=layer,
        kept_image_indices=kept_image_indices,
        return_cues=return_cues,
        normalize_keys=normalize_keys,
        renumber_positions=renumber_positions,
    )
    return (logits, cues) if return_cues else logits


@torch.no_grad()
def staged_selection(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, pruning: PruneConfig):
    """The kept sets of a multi-stage method that ranks by ``StageAttention`` (PyramidDrop), as its
    released code selects them on the prompt: at each stage, the attention of the last prompt token in
    the stage's own layer, on the sequence entering it (renumbered if the method renumbers), then the
    method's torch selection. Returns ``[(layer, kept indices into the original image span), ...]``."""
    language_model = model.model.language_model
    layers = language_model.layers
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    hidden = embed_inputs(model, input_ids, pixel_values)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    present = torch.arange(image_positions.numel())  # original image indices still in the sequence
    rows = image_positions.clone()  # where they sit in the current sequence
    stages, start = [], 0
    for stage in pruning.stages(image_positions.numel(), len(layers)):
        hidden = _run_layers(language_model, hidden, positions, layers[start : stage.layer])
        attention = _last_token_attention(language_model, layers[stage.layer], hidden, positions, rows)
        order = pruning.torch_reference_order({"attention": attention.float().cpu()}, stage.keep, None)
        chosen = torch.sort(order.to(present.device)).values
        keep = _kept_sequence_positions(hidden.shape[1], rows, chosen)
        hidden, present = hidden[:, keep], present[chosen]
        rows = torch.searchsorted(keep, rows[chosen])
        positions = (
            torch.arange(hidden.shape[1], device=hidden.device)[None]
            if pruning.renumber_positions
            else positions[:, keep]
        )
        stages.append((stage.layer, present.clone()))
        start = stage.layer
    return stages


@torch.no_grad()
def staged_forward(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor, stages, *, renumber_positions: bool = False
) -> torch.Tensor:
    """Prefill logits (1, S', V) float32 with the image tokens pruned in several stages.

    stages: ``[(layer, kept_image_indices), ...]`` in increasing layer order, each kept set given as
    ascending indices into the ORIGINAL image span (and contained in the previous stage's): layers
    from ``layer`` on see the text tokens and those image tokens, at their original positions, or
    renumbered 0..L'-1 after every stage (``renumber_positions``, PyramidDrop as released; the
    tokens after the prompt, as in ``reference_generate``'s loop, continue each layer's numbering).
    """
    language_model = model.model.language_model
    layers = language_model.layers
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    hidden = embed_inputs(model, input_ids, pixel_values)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    original = positions  # each remaining token's index in the unpruned sequence
    start = 0
    for layer, kept in stages:
        hidden = _run_layers(language_model, hidden, positions, layers[start:layer])
        keep = _kept_sequence_positions(input_ids.shape[1], image_positions, kept)
        still_there = torch.isin(keep, original[0])
        if not bool(still_there.all()):
            raise ValueError(f"stage at layer {layer} keeps image tokens an earlier stage dropped")
        rows = torch.searchsorted(original[0], keep)
        hidden, positions, original = hidden[:, rows], positions[:, rows], original[:, rows]
        if renumber_positions:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        start = layer
    hidden = _run_layers(language_model, hidden, positions, layers[start:])
    return model.lm_head(language_model.norm(hidden)).float()


@torch.no_grad()
def staged_generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    stages,
    *,
    max_new_tokens: int,
    eos_token_id: int | Collection[int],
    renumber_positions: bool = False,
) -> list[int]:
    """Greedy new tokens of ``staged_forward`` (EOS included when reached), no KV cache: each step
    reruns it on prompt + generated tokens, which continue every layer's own numbering."""
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    sequence, generated = input_ids, []
    for _ in range(max_new_tokens):
        logits = staged_forward(model, sequence, pixel_values, stages, renumber_positions=renumber_positions)
        token = int(torch.argmax(logits[0, -1]))
        generated.append(token)
        if token in stop_ids:
            break
        sequence = torch.cat([sequence, torch.tensor([[token]], device=sequence.device)], dim=1)
    return generated


def _head_mean_attention(language_model, decoder_layer, hidden: torch.Tensor, positions: torch.Tensor):
    """(S, S) float32 attention probabilities of every query over every key at ``decoder_layer``,
    averaged over heads: the layer's own projections and RoPE, transformers' eager attention function
    (float32 softmax over the causal keys), as the released SparseVLM scores with the eager matrix."""
    attention = decoder_layer.self_attn

    def split_heads(projected: torch.Tensor) -> torch.Tensor:  # (1, T, H*d) -> (1, H, T, d)
        return projected.view(1, projected.shape[1], -1, attention.head_dim).transpose(1, 2)

    normed = decoder_layer.input_layernorm(hidden)
    query, key, value = (
        split_heads(p(normed)) for p in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    cos, sin = language_model.rotary_emb(hidden, position_ids=positions)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    mask = causal_mask_by_position(positions, hidden.dtype)
    _, probabilities = eager_attention_forward(attention, query, key, value, mask, scaling=attention.scaling)
    return probabilities[0].float().mean(dim=0)


@dataclass(frozen=True)
class MergeStage:
    """One stage of a method that merges inside the LLM (``merges_in_llm``), as its reference ran it."""

    layer: int  # the first decoder layer that sees the stage's sequence
    kept: torch.Tensor  # (k,) ascending indices into the image tokens entering the stage
    clusters: list[torch.Tensor]  # each merged token's members, indices like ``kept``, in token order
    present: torch.Tensor  # (k + c,) each image token after the stage: original index, -1 = merged
    merged: torch.Tensor  # (c, d) the merged tokens' hidden states


def _merging_prefill(model, inputs_embeds, image_positions, pruning: PruneConfig, replay=None):
    """Logits (1, S', V) float32 and the stages of a merging method on one prompt: at each stage,
    the layer before it runs on the current sequence, the method's ``torch_reference_select_and_merge``
    reads its attention and output (``replay``: a list of ``MergeStage`` to repeat instead), and the
    sequence becomes [before the image | kept | merged | after the image], renumbered 0..L'-1 (as
    released; tokens appended after the prompt continue every layer's own numbering)."""
    language_model = model.model.language_model
    layers = language_model.layers
    if not bool((image_positions.diff() == 1).all()):
        raise ValueError("the merging reference needs the image tokens in one contiguous span")
    hidden, original_image = inputs_embeds, image_positions
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    present = torch.arange(image_positions.numel())
    planned = pruning.stages(image_positions.numel(), len(layers)) if replay is None else replay
    stages, start = [], 0
    for index, stage in enumerate(planned):
        hidden = _run_layers(language_model, hidden, positions, layers[start : stage.layer - 1])
        pruned_layer = layers[stage.layer - 1]
        attention = None
        if replay is None:
            attention = _head_mean_attention(language_model, pruned_layer, hidden, positions)
        hidden = _run_layers(language_model, hidden, positions, layers[stage.layer - 1 : stage.layer])
        if replay is None:
            cues = {
                "input_embeddings": inputs_embeds[0].float(),
                "input_image_positions": original_image,
                "attention": attention,
                "hidden": hidden[0].float(),
                "image_positions": image_positions,
            }
            kept, clusters = pruning.torch_reference_select_and_merge(cues, index)
        else:
            kept, clusters = stage.kept, stage.clusters
        image_start, image_end = int(image_positions[0]), int(image_positions[-1]) + 1
        merged = torch.stack([hidden[0, image_start + members].mean(dim=0) for members in clusters])
        hidden = torch.cat(
            [hidden[:, :image_start], hidden[:, image_start + kept], merged[None], hidden[:, image_end:]],
            dim=1,
        )
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        image_positions = torch.arange(
            image_start, image_start + kept.numel() + len(clusters), device=hidden.device
        )
        present = torch.cat([present[kept.cpu()], torch.full((len(clusters),), -1)])
        stages.append(MergeStage(stage.layer, kept, clusters, present, merged.float()))
        start = stage.layer
    hidden = _run_layers(language_model, hidden, positions, layers[start:])
    return model.lm_head(language_model.norm(hidden)).float(), stages


@torch.no_grad()
def merging_selection(model, input_ids, pixel_values, pruning: PruneConfig) -> list[MergeStage]:
    """The stages of a method that merges inside the LLM (``pruning.merges_in_llm``, SparseVLM), as
    its released code runs them on the prompt (``torch_reference_select_and_merge`` of its config on
    the eager attention and the output of each pruned layer)."""
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    embeds = embed_inputs(model, input_ids, pixel_values)
    return _merging_prefill(model, embeds, image_positions, pruning)[1]


@torch.no_grad()
def merging_forward(model, input_ids, pixel_values, pruning: PruneConfig, stages=None) -> torch.Tensor:
    """Prefill logits (1, S', V) float32 of a method that merges inside the LLM: its own stages, or
    ``stages`` (from ``merging_selection``) repeated."""
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    embeds = embed_inputs(model, input_ids, pixel_values)
    return _merging_prefill(model, embeds, image_positions, pruning, stages)[0]


@torch.no_grad()
def merging_generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    pruning: PruneConfig,
    stages,
    *,
    max_new_tokens: int,
    eos_token_id: int | Collection[int],
) -> list[int]:
    """Greedy new tokens of ``merging_forward`` with the prompt's ``stages`` (EOS included when
    reached), no KV cache: each step reruns the layers on prompt + generated tokens with the same
    kept and merged tokens, and every new token continues each layer's own numbering (the released
    decode: a layer's position is its cache length)."""
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    embeds = embed_inputs(model, input_ids, pixel_values)
    embed_tokens = model.get_input_embeddings()
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = _merging_prefill(model, embeds, image_positions, pruning, stages)
        token = int(torch.argmax(logits[0, -1]))
        generated.append(token)
        if token in stop_ids:
            break
        embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]], device=embeds.device))], dim=1)
    return generated


@torch.no_grad()
def layer_reference_cues(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, layer: int) -> dict:
    """What an in-LLM method reading the whole layer K - 1 sees (DART), for one prompt, computed as its
    released code reads it: ``layer_keys`` (S, H * D) the layer's post-RoPE keys, repeated per query
    head; ``normed_hidden`` (S, d) its output through the LLM's final norm; ``image_positions`` (N,)."""
    language_model = model.model.language_model
    layers = language_model.layers
    if not 1 <= layer < len(layers):
        raise ValueError(f"layer must be in [1, {len(layers) - 1}], got {layer}")
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    hidden = embed_inputs(model, input_ids, pixel_values)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    hidden = _run_layers(language_model, hidden, positions, layers[: layer - 1])
    attention = layers[layer - 1].self_attn
    key = attention.k_proj(layers[layer - 1].input_layernorm(hidden))
    key = key.view(1, key.shape[1], -1, attention.head_dim).transpose(1, 2)
    cos, sin = language_model.rotary_emb(hidden, position_ids=positions)
    key = apply_rotary_pos_emb(key, key, cos, sin)[1]
    key = torch.repeat_interleave(key, attention.num_key_value_groups, dim=1)  # transformers' repeat_kv
    output = _run_layers(language_model, hidden, positions, layers[layer - 1 : layer])
    return {
        "layer_keys": key[0].transpose(0, 1).reshape(key.shape[2], -1).float(),
        "normed_hidden": language_model.norm(output)[0].float(),
        "image_positions": image_positions.float(),
    }


@torch.no_grad()
def vision_readout(model, pixel_values: torch.Tensor, layer: int):
    """One encoder layer of transformers' CLIP tower for one image, as the released pre-LLM methods read
    it with ``output_attentions``: (attention probabilities (H, S, S), output ``hidden_states[layer]``
    (S, d), raw key states (H, S, D)), [CLS] first. The attention is transformers' own eager function
    on the layer's own projections, so it holds whichever attention the model was loaded with."""
    tower = model.model.vision_tower
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    index = layer % len(states)
    if index == 0:
        raise ValueError(f"hidden_states[{layer}] is the embedding output, not an encoder layer's")
    encoder_layer = getattr(tower, "vision_model", tower).encoder.layers[index - 1]  # either spelling
    attention = encoder_layer.self_attn
    normed = encoder_layer.layer_norm1(states[index - 1])
    shape = (*normed.shape[:2], -1, attention.head_dim)
    q, k, v = (
        proj(normed).view(shape).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    _, probabilities = clip_eager_attention(attention, q, k, v, None, scaling=attention.scale, dropout=0.0)
    return probabilities[0], states[index][0], k[0]


@torch.no_grad()
def vision_reference_cues(model, pixel_values: torch.Tensor, pruning: PruneConfig) -> dict[str, torch.Tensor]:
    """The vision-tower cues of a pre-LLM method for one image, as released code reads them with
    ``output_attentions``: ``vision_attention`` (N,) the head-mean [CLS] attention over the LLM's image
    tokens and ``vision_features`` (N, d) those tokens' features before the projector."""
    attentions, hidden, _ = vision_readout(model, pixel_values, pruning.vision_layer())
    offset = 1 if model.config.vision_feature_select_strategy == "default" else 0
    return {
        "vision_attention": attentions[:, 0, offset:].float().mean(dim=0),
        "vision_features": hidden[offset:].float(),
    }


@torch.no_grad()
def joint_reference_cues(
    model, clip_directory: str, input_ids: torch.Tensor, pixel_values: torch.Tensor, query_ids, layer: int
) -> dict[str, torch.Tensor]:
    """CDPruner's cues for one image and question, as its released vision tower computes them:
    ``image_embeds`` (N, C) the ``hidden_states[layer]`` image tokens through the tower's
    post_layernorm and the ``visual_projection`` of ``CLIPVisionModelWithProjection`` loaded from
    ``clip_directory``; ``text_embeds`` (M, C) of ``CLIPTextModelWithProjection`` from there on the
    tokenized question ``query_ids`` zero-padded to a multiple of max_position_embeddings and cut
    into segments; ``embeddings`` (N, d) the projected image features the LLM receives."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    device = pixel_values.device
    projection = CLIPVisionModelWithProjection.from_pretrained(clip_directory).visual_projection
    text_tower = CLIPTextModelWithProjection.from_pretrained(clip_directory).eval()
    tower = model.model.vision_tower
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    hidden = states[layer][0, states[layer].shape[1] - image_positions.numel() :]
    post_layernorm = getattr(tower, "vision_model", tower).post_layernorm
    image_embeds = projection.to(device)(post_layernorm(hidden).float())

    length = text_tower.config.max_position_embeddings
    ids = torch.tensor([list(query_ids)])
    count = (ids.shape[1] - 1) // length + 1
    padding = length * count - ids.shape[1]
    text_inputs = {
        "input_ids": torch.cat([ids, ids.new_zeros((1, padding))], dim=1).reshape(-1, length),
        "attention_mask": torch.cat([torch.ones_like(ids), ids.new_zeros((1, padding))], dim=1).reshape(
            -1, length
        ),
    }
    text_embeds = text_tower.to(device)(**{k: v.to(device) for k, v in text_inputs.items()}).text_embeds
    embeddings = embed_inputs(model, input_ids, pixel_values)[0, image_positions]
    return {
        "image_embeds": image_embeds.float(),
        "text_embeds": text_embeds.float(),
        "embeddings": embeddings.float(),
    }


@torch.no_grad()
def merged_embeds(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, pruning: PruneConfig):
    """Input embeddings of a merging method (``pruning.merges``) as released, and the image-token
    indices it passed through unchanged: its tokens built from the vision tower by its
    ``torch_reference_merge`` and projected, in the first ``keep`` image slots (the rest of the span
    is dropped by ``merged_sequence``)."""
    attentions, hidden, keys = vision_readout(model, pixel_values, pruning.vision_layer())
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    keep = pruning.resolve_keep(image_positions.numel())
    tokens, kept = pruning.torch_reference_merge(attentions, hidden, keys, keep)
    embeds = model.model.get_input_embeddings()(input_ids).clone()
    embeds[0, image_positions[:keep]] = model.model.multi_modal_projector(tokens[None])[0].to(embeds.dtype)
    return embeds, kept


def merged_sequence(keep: int) -> dict:
    """The pruning arguments of ``pruned_forward`` / ``reference_generate`` that turn ``merged_embeds``
    into the released shorter prompt: the first ``keep`` image slots, contiguous positions."""
    return {"layer": 0, "kept_image_indices": torch.arange(keep), "renumber_positions": True}


@torch.no_grad()
def merged_forward(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, pruning: PruneConfig):
    """Prefill logits (1, S', V) float32 of a merging method as released, and its passed-through
    image-token indices."""
    embeds, kept = merged_embeds(model, input_ids, pixel_values, pruning)
    keep = pruning.resolve_keep(image_token_positions(input_ids, model.config.image_token_index).numel())
    return pruned_forward(model, input_ids, pixel_values, inputs_embeds=embeds, **merged_sequence(keep)), kept


@torch.no_grad()
def reference_generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    layer: int | None = None,
    kept_image_indices=None,
    max_new_tokens: int,
    eos_token_id: int | Collection[int],
    renumber_positions: bool = False,
    inputs_embeds: torch.Tensor | None = None,
) -> list[int]:
    """Greedy new tokens (EOS included when reached) with the pruning fixed at prefill.

    No KV cache: each step reruns the pruned forward on prompt + generated tokens. Generated tokens are
    text tokens, always kept, at positions original_length + t, which is what a cached decoder must
    reproduce. The merged prompt embeddings are computed once (the vision tower is deterministic), or
    given (``merged_embeds``).
    """
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    image_positions = image_token_positions(input_ids, model.config.image_token_index)
    if inputs_embeds is None:
        inputs_embeds = embed_inputs(model, input_ids, pixel_values)
    embed_tokens = model.get_input_embeddings()
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = _decoder_forward(
            model,
            inputs_embeds,
            image_positions,
            layer=layer,
            kept_image_indices=kept_image_indices,
            return_cues=False,
            normalize_keys=False,
            renumber_positions=renumber_positions,
        )
        token = int(torch.argmax(logits[0, -1]))
        generated.append(token)
        if token in stop_ids:
            break
        next_embedding = embed_tokens(torch.tensor([[token]], device=inputs_embeds.device))
        inputs_embeds = torch.cat([inputs_embeds, next_embedding], dim=1)
    return generated


def _as_float_tensor(values, name: str, method: str) -> torch.Tensor:
    """A float32 CPU tensor from an array or tensor input of `reference_select`."""
    if values is None:
        raise ValueError(f"method {method!r} needs {name}")
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float()
    return torch.as_tensor(np.asarray(values), dtype=torch.float32)


def reference_select(
    method: str,
    *,
    keep: int,
    attention=None,
    keys=None,
    embeddings=None,
    vision_attention=None,
    vision_features=None,
    layer_keys=None,
    normed_hidden=None,
    image_positions=None,
    image_embeds=None,
    text_embeds=None,
    grid: int | None = None,
    seed: int = 0,
    **method_kwargs,
) -> np.ndarray:
    """Kept image-token indices (int64, ascending) as the released PyTorch code selects them.

    ``method`` is any registered method with a torch reference (``has_torch_reference``); its config
    says which cues it reads (``reference_cues``: attention (N,), keys (N, D) or embeddings (N, D), for
    one image) and which of its settings the reference takes (``reference_options``). grid defaults
    to sqrt(N). ``seed`` is accepted so the JAX library's call can be forwarded unchanged; methods
    without a reference (random, uniform) have nothing to reference, so pass the JAX side's indices
    to ``pruned_forward`` directly.
    """
    from adaptprune_jax import methods

    try:
        config_class = methods.get(method)
    except ValueError:
        with_reference = [name for name in methods.names() if methods.get(name).has_torch_reference]
        raise ValueError(
            f"unknown method {method!r}; reference methods: {', '.join(with_reference)}"
        ) from None
    unknown = set(method_kwargs) - set(config_class.reference_options)
    if unknown:
        raise ValueError(
            f"method {method!r} takes no option(s) {sorted(unknown)}; "
            f"its options: {sorted(config_class.reference_options) or 'none'}"
        )
    config = config_class(**method_kwargs)
    if config.merges_in_llm:
        raise ValueError(
            f"{method} merges tokens inside the LLM, so its selection depends on every stage: use "
            "merging_selection / merging_forward"
        )
    if config.merges:
        raise ValueError(
            f"{method} builds the LLM's image tokens itself, so it has no selection to reference: "
            "use merged_forward / merged_embeds"
        )
    if not config.has_torch_reference:
        config.torch_reference_order({}, keep, grid)  # raises, saying what to do instead
    given = {
        "attention": attention,
        "keys": keys,
        "embeddings": embeddings,
        "vision_attention": vision_attention,
        "vision_features": vision_features,
        "layer_keys": layer_keys,
        "normed_hidden": normed_hidden,
        "image_positions": image_positions,
        "image_embeds": image_embeds,
        "text_embeds": text_embeds,
    }
    cues = {name: _as_float_tensor(given[name], name, method) for name in config.reference_cues}
    per_image_token = [
        name for name in config.reference_cues if name not in ("layer_keys", "normed_hidden", "text_embeds")
    ]
    num_tokens = cues[per_image_token[0]].shape[0]
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep must be in [1, {num_tokens}], got {keep}")
    order = config.torch_reference_order(cues, keep, grid)
    return np.sort(order.numpy().astype(np.int64))
