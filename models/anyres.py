"""LLaVA-NeXT's anyres packing, on the host in NumPy: which crop feature fills each image-token slot.

transformers' `pack_image_features` builds each image's tokens from its crops' features: the base
crop's patch grid first, then the high-resolution crops reassembled into one global grid (crop rows x
patch rows by crop columns x patch columns), cut to the image's aspect by `unpad_image`, with the
learned `image_newline` after every grid row. All of that depends only on the image's size, so it is
computed here once per batch, as a gather index into the flat (batch x crops x patches) features of one
vision-tower pass (plus one row for `image_newline`), and a `TokenLayout` row per image: the base grid
is grid 0, the high-resolution grid grid 1 (cells counted from the unpadded corner), the newline tokens
sit on no grid. The model then packs with a single gather (`LlavaForConditionalGeneration.packed_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from transformers.image_processing_utils import select_best_resolution

import adaptprune_jax as prune
from models.config import LlavaModelConfig

NEWLINE = -1
"""Index of an `image_newline` token in an image's own feature index (`image_feature_index`)."""


class PackedImages(NamedTuple):
    """A batch's image tokens, padded to ``N`` per row."""

    index: np.ndarray  # (B, N) int32 into the flat crop features; the last row is image_newline
    layout: prune.TokenLayout  # (B, N), padding slots invalid
    counts: np.ndarray  # (B,) each image's real image-token count


def _crop_size(cfg: LlavaModelConfig) -> int:
    return cfg.vision.image_size


def crop_grid(image_size: Sequence[int], cfg: LlavaModelConfig) -> tuple[int, int]:
    """(crop rows, crop columns) of an image of ``image_size`` (height, width): the pinpoint
    transformers' processor resizes it into, in crops (`get_anyres_image_grid_shape`)."""
    height, width = select_best_resolution([int(side) for side in image_size], cfg.image_grid_pinpoints)
    return height // _crop_size(cfg), width // _crop_size(cfg)


def num_crops(image_size: Sequence[int], cfg: LlavaModelConfig) -> int:
    """Crops the processor gives an image: the base crop plus the high-resolution ones."""
    rows, cols = crop_grid(image_size, cfg)
    return 1 + rows * cols


def max_crops(cfg: LlavaModelConfig) -> int:
    """The most crops any image takes (the largest pinpoint's, plus the base crop)."""
    size = _crop_size(cfg)
    return 1 + max((height // size) * (width // size) for height, width in cfg.image_grid_pinpoints)


def unpadded_span(image_size: Sequence[int], rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a ``rows x cols`` feature grid that `unpad_image` keeps for an image of
    ``image_size`` (height, width): the padding the processor added to fit the pinpoint's aspect,
    removed from both sides, with its ``int(round(x, 7))`` rounding."""
    height, width = (int(side) for side in image_size)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        padding = (rows - new_rows) // 2
        return slice(padding, rows - padding), slice(0, cols)
    new_cols = int(round(width * (rows / height), 7))
    padding = (cols - new_cols) // 2
    return slice(0, rows), slice(padding, cols - padding)


def image_feature_index(
    image_size: Sequence[int], cfg: LlavaModelConfig
) -> tuple[np.ndarray, prune.TokenLayout]:
    """One image's tokens in transformers' packed order: (index into its own crops' features, crop c's
    patch p at ``c * patches + p``, ``NEWLINE`` for a newline token) and their layout."""
    grid = cfg.vision.grid_size
    patches = cfg.features_per_crop
    crop_rows, crop_cols = crop_grid(image_size, cfg)
    row_span, col_span = unpadded_span(image_size, crop_rows * grid, crop_cols * grid)
    rows = np.arange(row_span.start, row_span.stop)[:, None]
    cols = np.arange(col_span.start, col_span.stop)[None, :]
    crop = 1 + (rows // grid) * crop_cols + cols // grid  # crop 0 is the base image
    high_res = crop * patches + (rows % grid) * grid + cols % grid
    with_newlines = np.concatenate([high_res, np.full((high_res.shape[0], 1), NEWLINE)], axis=1)
    index = np.concatenate([np.arange(patches), with_newlines.reshape(-1)])
    height, width = high_res.shape
    line = prune.concat_layouts(prune.grid_layout(1, width), prune.off_grid_layout(1))
    high_res_layout = prune.concat_layouts(*(_row_of(line, row, height) for row in range(height)))
    return index.astype(np.int32), prune.concat_layouts(prune.grid_layout(grid, grid, 0), high_res_layout)


def _row_of(line: prune.TokenLayout, row: int, height: int) -> prune.TokenLayout:
    """``line`` (one grid row and its newline) as row ``row`` of grid 1, ``height`` rows tall."""
    on_grid = np.asarray(line.grid) != prune.NO_GRID
    return line.replace(
        row=np.where(on_grid, row, 0).astype(np.float32),
        grid=np.where(on_grid, 1, prune.NO_GRID).astype(np.int32),
        grid_rows=np.where(on_grid, height, 0).astype(np.int32),
    )


def image_token_count(image_size: Sequence[int], cfg: LlavaModelConfig) -> int:
    """Image tokens an image of ``image_size`` (height, width) puts in the prompt, newlines included."""
    grid = cfg.vision.grid_size
    crop_rows, crop_cols = crop_grid(image_size, cfg)
    row_span, col_span = unpadded_span(image_size, crop_rows * grid, crop_cols * grid)
    rows, cols = row_span.stop - row_span.start, col_span.stop - col_span.start
    return cfg.features_per_crop + rows * (cols + 1)


def max_image_tokens(cfg: LlavaModelConfig) -> int:
    """The most image tokens any image takes: a pinpoint's full grid (nothing unpadded) with its
    newlines, plus the base crop."""
    size, grid = _crop_size(cfg), cfg.vision.grid_size
    return cfg.features_per_crop + max(
        (height // size) * grid * ((width // size) * grid + 1) for height, width in cfg.image_grid_pinpoints
    )


def pack_images(
    image_sizes: Sequence[Sequence[int]], cfg: LlavaModelConfig, crops: int, num_tokens: int
) -> PackedImages:
    """The gather index and layout of a batch whose crops are ``(B, crops)`` (each row's real crops
    first): row b's crop c, patch p is flat feature ``(b * crops + c) * patches + p``, and the flat row
    after all of them is `image_newline`, which newline and padding slots read."""
    patches = cfg.features_per_crop
    newline_row = len(image_sizes) * crops * patches
    index = np.full((len(image_sizes), num_tokens), newline_row, np.int32)
    layouts, counts = [], []
    for row, size in enumerate(image_sizes):
        if num_crops(size, cfg) > crops:
            raise ValueError(
                f"image {row} of size {tuple(size)} takes {num_crops(size, cfg)} crops, more than {crops}"
            )
        local, layout = image_feature_index(size, cfg)
        if local.size > num_tokens:
            raise ValueError(
                f"image {row} of size {tuple(size)} has {local.size} image tokens, more than {num_tokens}"
            )
        index[row, : local.size] = np.where(local == NEWLINE, newline_row, row * crops * patches + local)
        layouts.append(layout)
        counts.append(local.size)
    return PackedImages(index, prune.stack_layouts(layouts, num_tokens), np.asarray(counts, np.int32))
