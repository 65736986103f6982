"""`TestbedConfig`: every size and distribution of the scenes and questions, in one place.

Image and patch size can be taken from a LLaVA config (`TestbedConfig.from_llava_config`), so the
scenes always match the vision tower they are rendered for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.testbed.words import COLOURS, KINDS, NUMBER_WORDS, SHAPES


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Sizes and distributions of the scenes and questions (hashable: a static argument to jit)."""

    __test__ = False  # not a pytest test class despite the name

    image_size: int = 336
    patch_size: int = 14
    min_objects: int = 3
    max_objects: int = 6
    # Object bounding-box side, in patches (1..3 patches = 14..42 px at the defaults).
    min_object_patches: float = 1.0
    max_object_patches: float = 3.0
    # Empty margin between any two objects' boxes, in patches (along at least one axis).
    object_gap_patches: float = 1.0
    # Centres of the two objects of a position question differ by at least this along its axis.
    relation_margin_patches: float = 1.0
    # Per-channel random offset added to an object's palette colour.
    colour_jitter: int = 12
    # Background: grey level, per-channel tint, then bilinear value-noise octaves (cell side in
    # pixels, amplitude), then per-pixel noise over the whole image.
    background_grey: tuple[int, int] = (50, 115)
    background_tint: int = 15
    background_octaves: tuple[tuple[int, int], ...] = ((56, 25), (14, 10))
    pixel_noise: int = 10
    # Mild non-uniform priors over colours and shapes: POPE's "popular" negatives are absent objects
    # that are frequent in the dataset, which only means something when frequencies differ.
    colour_prior: tuple[float, ...] = (0.20, 0.17, 0.15, 0.14, 0.12, 0.12, 0.10)
    shape_prior: tuple[float, ...] = (0.27, 0.23, 0.19, 0.16, 0.15)
    popular_top_k: int = 3
    # Question-kind mixture (existence is split evenly over the negative types in use).
    kind_weights: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    # Probability that a counting question targets an absent shape / colour (answer "zero").
    count_absent_probability: float = 0.15
    placement_candidates: int = 64

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 1 <= self.min_objects <= self.max_objects < len(NUMBER_WORDS):
            raise ValueError(f"need 1 <= min_objects <= max_objects < {len(NUMBER_WORDS)}")
        if len(self.colour_prior) != len(COLOURS) or len(self.shape_prior) != len(SHAPES):
            raise ValueError("colour_prior / shape_prior must have one weight per colour / shape")
        if len(self.kind_weights) != len(KINDS):
            raise ValueError(f"kind_weights needs one weight per kind {KINDS}")
        if not 0 < self.min_object_px <= self.max_object_px <= self.image_size // 2:
            raise ValueError("object sizes must lie in (0, image_size / 2]")

    @classmethod
    def from_llava_config(cls, llava_config, **overrides: Any) -> TestbedConfig:
        """Image and patch size from a transformers LlavaConfig's vision tower."""
        vision = llava_config.vision_config
        return cls(image_size=vision.image_size, patch_size=vision.patch_size, **overrides)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def min_object_px(self) -> int:
        return int(round(self.min_object_patches * self.patch_size))

    @property
    def max_object_px(self) -> int:
        return int(round(self.max_object_patches * self.patch_size))

    @property
    def object_gap_px(self) -> int:
        return int(round(self.object_gap_patches * self.patch_size))

    @property
    def relation_margin_px(self) -> int:
        return int(round(self.relation_margin_patches * self.patch_size))

    def octave_grid_points(self, cell: int) -> int:
        """Lattice points per side of a value-noise octave with `cell`-pixel cells."""
        return self.image_size // cell + 2


DEFAULT_CONFIG = TestbedConfig()
