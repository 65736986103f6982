"""SparseVLM (v1.5): text raters rank the image tokens inside the LLM at three layers; the best are
kept, and a few of the pruned ones are recycled into merged tokens.

What the released code (Gumpest/SparseVLMs, tag v1.5, ``modelling_sparse_llama.py``, ``score.py``,
``utils.py``) does at prefill, batch 1, and this file reproduces:
1. Raters, once, from the LLM's layer-0 input: the softmax over the text tokens after the image of
   each image embedding's dot products with their embeddings, averaged over the image tokens; the
   text tokens above the average (strictly) rate.
2. At each pruning layer l (2, 6, 15 of 32), layer l runs on the whole current sequence; its
   attention probabilities (softmax over every causal key, head mean) of the raters' rows over the
   current image tokens, averaged over the raters, score them. The top
   ``k = min(schedule[l], V - 1)`` are kept in their order (at least one token is always pruned).
3. Recycling: of the ``p = V - k`` pruned tokens, the ``n = int(0.3 p) + 1`` best scored are
   clustered by DPC-kNN on layer l's output into ``c = int(n / 10) + 1`` clusters, each replaced by
   the mean of its members' hidden states (``dpc_knn_merge``).
4. The sequence becomes [before the image | kept | merged, in cluster-centre order | text], renumbered
   0..L'-1; later layers see the ``k + c`` tokens as image tokens (merged ones may be pruned, kept or
   merged again). Decoding continues each layer's own numbering (a layer's position = its cache length).

Budgets: the released budgets 192, 128 and 64 are per-layer schedules ([300, 200, 110], [303, 110,
36], [66, 30, 17]); ``keep`` names one, and any other budget needs ``schedule=`` (``keep`` is then
unused). ``resolve_keep`` is the count after the last stage (113, 39, 18 of 576), and
``equivalent_tokens`` the released log's per-layer average (192.03, 128.6, 64.8 on 32 layers).
The released layers do not follow the LLM's depth (its ``pruning_loc`` is fixed), so ``layers=None``
means 2, 6, 15 on any LLM deep enough (17 layers or more); a shallower one needs ``layers=``.

Ours: batches of prompts of different lengths (rows independent); float32 throughout (the released
code computes in fp16); ties go to the lower index (CUDA ``topk`` leaves them unspecified); no random
density noise in the clustering (the released 1e-6 ``torch.rand`` vanishes in fp16 next to densities
above ~0.002 and is unseeded); a merged token is the plain mean of its members (the released weight
``1 / (count + 1e-6)`` is that in fp16); when no text token lies above the average (all equal), all
of them rate (the released code would score NaN).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from adaptprune_jax.baselines import topk_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import (
    Cues,
    Embeddings,
    InputEmbeddings,
    InputEmbeddingsArrays,
    KeptAndMerged,
    PruneConfig,
    QueryAttention,
    Stage,
    UnsupportedBudget,
    check_int,
    check_keep_type,
)
from adaptprune_jax.nms import SIMILARITY_PRECISION

RELEASED_LAYERS = (2, 6, 15)  # pruning on these layers' output, fixed whatever the LLM's depth
RELEASED_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
RECYCLED_FRACTION = 0.3  # of the pruned tokens, the best scored this fraction (+ 1) are recycled
TOKENS_PER_CLUSTER = 10  # recycled tokens per merged token (+ 1 cluster)


class StageSplit(NamedTuple):
    """What one stage does to the ``V`` image tokens entering it."""

    kept: int  # k = min(schedule value, V - 1)
    recycled: int  # n = int(0.3 * (V - k)) + 1 of the pruned tokens, clustered
    merged: int  # c = int(n / 10) + 1 clusters, each one token


def stage_split(num_tokens: int, target: int) -> StageSplit:
    """The released counts of a stage (``score.py`` and the recycling in ``modelling_sparse_llama.py``)."""
    kept = min(target, num_tokens - 1)
    recycled = int((num_tokens - kept) * RECYCLED_FRACTION) + 1
    return StageSplit(kept, recycled, int(recycled / TOKENS_PER_CLUSTER) + 1)


def text_raters(inputs: InputEmbeddingsArrays) -> jax.Array:
    """(B, S0) bool: the text tokens after the image that rate the image tokens, on the layer-0 input.

    Each image embedding's dot products with the text embeddings go through a softmax over the text
    tokens; the text tokens whose probability, averaged over the image tokens, exceeds the average
    over the text tokens rate. When none does (all equal), every text token rates (ours).
    """
    embeddings = inputs.embeddings.astype(jnp.float32)
    slots = jnp.arange(embeddings.shape[1])
    last_image = jnp.max(inputs.image_slots, axis=1, keepdims=True)
    text = (slots[None] > last_image) & (inputs.positions >= 0)
    image = jnp.take_along_axis(embeddings, inputs.image_slots[..., None], axis=1)
    logits = jnp.einsum("bnd,bsd->bns", image, embeddings, precision=SIMILARITY_PRECISION)
    logits = jnp.where(text[:, None], logits, jnp.finfo(jnp.float32).min)
    relevance = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
    count = jnp.maximum(jnp.sum(text, axis=1, keepdims=True), 1)
    average = jnp.sum(jnp.where(text, relevance, 0.0), axis=1, keepdims=True) / count
    raters = text & (relevance > average)
    return jnp.where(jnp.any(raters, axis=1, keepdims=True), raters, text)


def rater_scores(inputs: InputEmbeddingsArrays, query_attention: jax.Array) -> jax.Array:
    """(B, N) float32: the raters' attention rows over the current image tokens, averaged over the
    raters (zero where a prompt has no text after its image)."""
    raters = text_raters(inputs)
    origin = inputs.origin
    current = jnp.take_along_axis(raters, jnp.maximum(origin, 0), axis=1) & (origin >= 0)
    rows = jnp.where(current[..., None], query_attention.astype(jnp.float32), 0.0)
    return jnp.sum(rows, axis=1) / jnp.maximum(jnp.sum(current, axis=1), 1)[:, None]


def dpc_knn_merge(tokens: jax.Array, clusters: int) -> jax.Array:
    """(B, n, C) -> (B, clusters, C) float32: DPC-kNN clustering, each cluster's mean, in centre order.

    As the released ``cluster_and_merge`` (TCFormer's): distances ``|x_i - x_j| / sqrt(C)``; density
    ``exp(-mean of the squared distances to the `clusters` nearest tokens, itself included)``; delta
    the distance to the nearest denser token (the largest distance of the matrix for the densest);
    centres the top ``delta * density``; every token joins its nearest centre (the first on ties),
    each centre its own cluster. Distances come from the Gram matrix of the centred tokens (the
    pairwise differences would take n^2 C memory).
    """
    tokens = tokens.astype(jnp.float32)
    batch, count, width = tokens.shape
    centred = tokens - jnp.mean(tokens, axis=1, keepdims=True)
    squares = jnp.sum(jnp.square(centred), axis=-1)
    gram = jnp.einsum("bid,bjd->bij", centred, centred, precision=SIMILARITY_PRECISION)
    squared = jnp.maximum(squares[:, :, None] + squares[:, None, :] - 2.0 * gram, 0.0)
    squared = jnp.where(jnp.eye(count, dtype=bool), 0.0, squared)
    distance = jnp.sqrt(squared) / math.sqrt(width)
    nearest = -lax.top_k(-distance, clusters)[0]
    density = jnp.exp(-jnp.mean(jnp.square(nearest), axis=-1))
    denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: token j is denser than token i
    largest = jnp.max(distance, axis=(1, 2), keepdims=True)
    delta = jnp.min(jnp.where(denser, distance, largest), axis=-1)
    _, centres = lax.top_k(delta * density, clusters)
    rows = jnp.arange(batch)[:, None]
    assignment = jnp.argmin(jnp.take_along_axis(distance, centres[..., None], axis=1), axis=1)
    assignment = assignment.at[rows, centres].set(jnp.arange(clusters)[None])
    members = jax.nn.one_hot(assignment, clusters, dtype=jnp.float32)  # (B, n, clusters)
    sums = jnp.einsum("bnc,bnd->bcd", members, tokens, precision=SIMILARITY_PRECISION)
    return sums / jnp.sum(members, axis=1)[..., None]


@register
@dataclasses.dataclass(frozen=True)
class SparseVLMConfig(PruneConfig):
    """SparseVLM's settings. ``keep``: the released budget (192, 128, 64) whose schedule to run;
    ``schedule``: the kept count k at each pruning layer instead (then ``keep`` is unused);
    ``layers``: the layers whose output is pruned (None: the released 2, 6, 15; the LLM needs at least
    17 layers for them)."""

    name: ClassVar[str] = "sparsevlm"
    has_layer: ClassVar[bool] = False
    renumber_positions: ClassVar[bool] = True
    merges_in_llm: ClassVar[bool] = True
    has_torch_reference: ClassVar[bool] = True
    small_model_settings: ClassVar[dict] = {"layers": (0, 1, 2), "schedule": (9, 6, 4)}
    layer: ClassVar[int | None] = None  # no single layer: its stages carry theirs

    keep: int | float = 192
    schedule: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_keep_type(self.keep)
        if self.schedule is None:
            if not isinstance(self.keep, numbers.Integral) or int(self.keep) not in RELEASED_SCHEDULES:
                raise UnsupportedBudget(
                    f"sparsevlm has no released schedule for keep={self.keep!r}: the released budgets "
                    f"are {', '.join(map(str, RELEASED_SCHEDULES))}; for another, give schedule= (the "
                    "image tokens kept at each pruning layer)."
                )
        else:
            self._check_int_tuple("schedule", self.schedule)
            if min(self.schedule) < 1:
                raise ValueError(f"schedule values must be >= 1, got {self.schedule}.")
        if self.layers is not None:
            self._check_int_tuple("layers", self.layers)
            if self.layers[0] < 0 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise ValueError(f"layers must increase from >= 0, got {self.layers}.")
        if len(self.targets) != len(self.pruning_layers):
            raise ValueError(
                f"sparsevlm: schedule {self.targets} has {len(self.targets)} entries for the "
                f"{len(self.pruning_layers)} pruning layers {self.pruning_layers}."
            )

    @staticmethod
    def _check_int_tuple(name: str, value) -> None:
        if not isinstance(value, tuple) or not value:
            raise ValueError(f"{name} must be a non-empty tuple of ints, got {value!r}.")
        for item in value:
            check_int(name, item)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        """The layers l whose output is pruned (each stage is before layer l + 1)."""
        return RELEASED_LAYERS if self.layers is None else self.layers

    @property
    def targets(self) -> tuple[int, ...]:
        """The schedule: image tokens kept at each pruning layer, before merged ones are added."""
        return RELEASED_SCHEDULES[int(self.keep)] if self.schedule is None else self.schedule

    def cue_requests(self):
        return (InputEmbeddings(), QueryAttention(), Embeddings())

    def splits(self, num_image_tokens: int) -> tuple[StageSplit, ...]:
        """Each stage's counts, from the ``num_image_tokens`` entering the first."""
        splits, count = [], num_image_tokens
        for target in self.targets:
            split = stage_split(count, target)
            splits.append(split)
            count = split.kept + split.merged
        return tuple(splits)

    def stages(self, num_image_tokens: int, num_layers: int | None = None) -> tuple[Stage, ...]:
        return tuple(
            Stage(layer + 1, split.kept + split.merged)
            for layer, split in zip(self.pruning_layers, self.splits(num_image_tokens))
        )

    def resolve_keep(self, num_image_tokens: int) -> int:
        return self.stages(num_image_tokens)[-1].keep

    def validate(self, num_image_tokens, num_layers, layout=None):
        if self.layers is None and num_layers < RELEASED_LAYERS[-1] + 2:
            raise ValueError(
                f"sparsevlm prunes on the output of the released layers {RELEASED_LAYERS}, which needs "
                f"an LLM of at least {RELEASED_LAYERS[-1] + 2} layers; this one has {num_layers}: "
                "give layers=."
            )
        if self.pruning_layers[-1] > num_layers - 2:
            raise ValueError(
                f"sparsevlm: layers={self.pruning_layers} reach past the LLM's {num_layers} layers: "
                f"pruning on layer l's output needs l <= {num_layers - 2}."
            )
        if num_image_tokens < 2:
            raise ValueError(f"sparsevlm prunes at least one token per stage: {num_image_tokens} is too few.")
        super().validate(num_image_tokens, num_layers, layout)

    def equivalent_tokens(self, num_image_tokens: int, num_layers: int) -> float:
        """The released log's "equal token num": image tokens after each layer, averaged over the
        layers; a pruning layer counts with the tokens it leaves (it computed on those it got)."""
        counts = [num_image_tokens] * num_layers
        for stage in self.stages(num_image_tokens, num_layers):
            counts[stage.layer - 1 :] = [stage.keep] * (num_layers - stage.layer + 1)
        return sum(counts) / num_layers

    def scores(self, cues: Cues) -> jax.Array:
        """(B, N) float32 rater score of each current image token."""
        inputs = cues.require("inputs", self.name)
        return rater_scores(inputs, cues.require("query_attention", self.name))

    def select(self, cues: Cues, keep: int) -> jax.Array:
        """The ``keep`` best scored image tokens (the selection alone, without the recycling)."""
        return topk_select(self.scores(cues), keep)

    def select_and_merge(self, cues: Cues, keep: int) -> KeptAndMerged:
        hidden = cues.require("embeddings", self.name)
        cues.require_dense(self.name)
        scores = self.scores(cues)
        batch, num_tokens = scores.shape
        split = stage_split(num_tokens, self.targets[cues.stage])
        if split.kept + split.merged != keep:
            raise ValueError(
                f"sparsevlm stage {cues.stage} leaves {split.kept} + {split.merged} tokens of "
                f"{num_tokens}, not keep={keep}."
            )
        _, top = lax.top_k(scores, split.kept)
        pruned = jnp.ones((batch, num_tokens), bool).at[jnp.arange(batch)[:, None], top].set(False)
        _, recycled = lax.top_k(jnp.where(pruned, scores, -jnp.inf), split.recycled)
        tokens = jnp.take_along_axis(hidden, recycled[..., None], axis=1)
        merged = dpc_knn_merge(tokens, split.merged)
        return KeptAndMerged(jnp.sort(top, axis=1).astype(jnp.int32), merged)

    # The PyTorch reference, written from the released code (one prompt) --------------------------
    def torch_reference_select_and_merge(self, cues, stage: int):
        """One stage as released, for one prompt whose image tokens are contiguous: ``cues`` holds
        ``input_embeddings`` (S0, d) the layer-0 input of the prompt and ``input_image_positions``
        (N0,) its image tokens' positions; ``attention`` (S, S) the pruning layer's head-mean
        attention probabilities, ``hidden`` (S, d) its output, ``image_positions`` (V,) the current
        image tokens' positions. Returns (kept (k,) ascending indices into the current image tokens,
        the members of each merged token as such indices, in centre order)."""
        import torch

        embeddings, original = cues["input_embeddings"], cues["input_image_positions"].long()
        device = embeddings.device
        image_start = int(original[0])
        text_start = image_start + original.numel()
        image, text = embeddings[image_start:text_start], embeddings[text_start:]
        relevance = (image @ text.T).softmax(dim=1).mean(dim=0)
        raters = torch.where(relevance > relevance.mean())[0]
        if raters.numel() == 0:  # ours: all equal, every text token rates
            raters = torch.arange(text.shape[0], device=device)
        positions = cues["image_positions"].long()
        start, count = int(positions[0]), positions.numel()
        rows = cues["attention"][raters + start + count][:, start : start + count]
        scores = rows.mean(dim=0) if rows.shape[0] else torch.zeros(count, device=device)
        split = stage_split(count, self.targets[stage])
        kept = torch.sort(torch.sort(scores, descending=True, stable=True).indices[: split.kept]).values
        pruned = torch.ones(count, dtype=torch.bool, device=device)
        pruned[kept] = False
        pruned = torch.where(pruned)[0]
        best = torch.sort(scores[pruned], descending=True, stable=True).indices[: split.recycled]
        recycled = pruned[best]
        assignment = self.torch_reference_clusters(cues["hidden"][start + recycled], split.merged)
        return kept, [recycled[assignment == cluster] for cluster in range(split.merged)]

    @staticmethod
    def torch_reference_clusters(tokens, clusters: int):
        """The released ``cluster_and_merge``'s assignment of each of ``tokens`` (n, C) to one of
        ``clusters`` clusters, numbered in centre order (no density noise, ties to the lower index)."""
        import torch

        width = tokens.shape[1]
        distance = (tokens[:, None, :] - tokens[None, :, :]).norm(dim=-1, p=2) / width**0.5
        nearest = torch.topk(distance, k=clusters, dim=-1, largest=False).values
        density = (-(nearest**2).mean(dim=-1)).exp()
        denser = (density[None, :] > density[:, None]).to(distance.dtype)
        delta = (distance * denser + distance.max() * (1 - denser)).min(dim=-1).values
        centres = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]
        assignment = distance[centres].argmin(dim=0)
        assignment[centres] = torch.arange(clusters, device=tokens.device)
        return assignment
