"""AdaptPrune: last-token attention x a centre prior, then adaptive NMS over grid distance and key
similarity (see docs/algorithm.md). Pruning at layer K, from layer K - 1's attention and layer K's
key projection."""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax

from adaptprune_jax.grid import DEFAULT_PRIOR_SIGMA, grid_side
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import (
    Cues,
    FeatureKeys,
    LastTokenAttention,
    PruneConfig,
    check_bool,
    check_positive,
)
from adaptprune_jax.nms import (
    DEFAULT_DISTANCE_LIMIT,
    DEFAULT_DISTANCE_SIGMA,
    DEFAULT_SIMILARITY_SIGMA,
    NMS_FORMS,
    NMS_IMPLEMENTATIONS,
    adaptprune_select,
    matmul_precision,
)


@register
@dataclasses.dataclass(frozen=True)
class AdaptPruneConfig(PruneConfig):
    """AdaptPrune's settings.

    ``normalize_keys`` asks the model for RMSNorm-ed feature keys (the clean variant); the default
    False reproduces the released code's un-normalised projection (QUIRK). ``nms_implementation``
    picks how the greedy loop runs ('auto' = the Pallas kernel on GPU, else XLA), ``nms_form`` where
    its factors live ('auto', 'dense' (N, N) or 'window' (N, K neighbours); see ``nms.NMS_FORMS``);
    all select the same tokens. ``similarity_precision`` is the key cosines' matmul precision by name
    ('highest', float32, the default; or a ``lax.DotAlgorithmPreset`` name, see ``nms.matmul_precision``).
    On a layout with several grids, the multi-grid rule of
    ``nms.adaptprune_scores``: tokens on no grid (newline, [CLS]) are kept and count in keep.
    """

    name: ClassVar[str] = "adaptprune"
    needs_grid: ClassVar[bool] = True
    keeps_off_grid_tokens: ClassVar[bool] = True
    has_torch_reference: ClassVar[bool] = True
    reference_cues: ClassVar[tuple[str, ...]] = ("attention", "keys")
    reference_options: ClassVar[tuple[str, ...]] = (
        "prior_sigma",
        "distance_limit",
        "distance_sigma",
        "similarity_sigma",
    )

    prior_sigma: float = DEFAULT_PRIOR_SIGMA
    distance_limit: float = DEFAULT_DISTANCE_LIMIT
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA
    normalize_keys: bool = False
    nms_implementation: str = "auto"
    nms_form: str = "auto"
    similarity_precision: str = "highest"

    def __post_init__(self):
        super().__post_init__()
        if self.nms_implementation not in NMS_IMPLEMENTATIONS:
            raise ValueError(
                f"nms_implementation must be one of {', '.join(NMS_IMPLEMENTATIONS)}, "
                f"got {self.nms_implementation!r}."
            )
        if self.nms_form not in NMS_FORMS:
            raise ValueError(f"nms_form must be one of {', '.join(NMS_FORMS)}, got {self.nms_form!r}.")
        for field in ("prior_sigma", "distance_sigma", "similarity_sigma"):
            check_positive(field, getattr(self, field))
        if isinstance(self.distance_limit, bool) or not isinstance(self.distance_limit, numbers.Real):
            raise ValueError(f"distance_limit must be a number, got {self.distance_limit!r}.")
        check_bool("normalize_keys", self.normalize_keys)
        matmul_precision(self.similarity_precision)
        # one name per precision: 'BF16_...' and 'bf16_...' are the same config (and the same program)
        object.__setattr__(self, "similarity_precision", self.similarity_precision.lower())

    def cue_requests(self):
        return (LastTokenAttention(), FeatureKeys(normalized=self.normalize_keys))

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return adaptprune_select(
            cues.require("attention", self.name),
            cues.require("keys", self.name),
            keep,
            layout=cues.layout,
            prior_sigma=self.prior_sigma,
            distance_limit=self.distance_limit,
            distance_sigma=self.distance_sigma,
            similarity_sigma=self.similarity_sigma,
            implementation=self.nms_implementation,
            form=self.nms_form,
            precision=matmul_precision(self.similarity_precision),
        )

    def torch_reference_order(self, cues, keep, grid):
        """Centre prior x attention, then the released NMS loop, in torch."""
        import torch
        import torch.nn.functional as F

        attention, keys = cues["attention"], cues["keys"]
        num_tokens = attention.numel()
        grid = grid_side(num_tokens) if grid is None else grid
        if grid * grid != num_tokens:
            raise ValueError(f"grid {grid} x {grid} does not hold {num_tokens} image tokens")
        x = torch.linspace(-(grid // 2), grid // 2, grid)
        prior = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * self.prior_sigma**2))
        scores = attention * (prior / prior.max()).reshape(-1)

        token = torch.arange(num_tokens)
        rows, cols = (token // grid).float(), (token % grid).float()
        unit_keys = F.normalize(keys, dim=-1)
        cosine = unit_keys @ unit_keys.T
        selected = torch.zeros(num_tokens, dtype=torch.bool)
        order = []
        for _ in range(keep):
            # Selected tokens are excluded outright: self-suppression leaves ~0, which can still win a
            # tie when every remaining score has underflowed to 0.
            chosen = int(torch.argmax(scores.masked_fill(selected, float("-inf"))))  # first index on ties
            selected[chosen] = True
            order.append(chosen)
            distance = torch.sqrt((rows - rows[chosen]) ** 2 + (cols - cols[chosen]) ** 2)
            factor = 1 - (
                torch.exp(-(distance**2) / (2 * self.distance_sigma**2))
                * torch.exp(-((1 - cosine[chosen]) ** 2) / (2 * self.similarity_sigma**2))
            )
            scores = torch.where(distance <= self.distance_limit, scores * factor, scores)
        return torch.tensor(order)
