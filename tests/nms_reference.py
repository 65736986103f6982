"""AdaptPrune's multi-grid rule in float64 NumPy, written from its description, for one layout row.

The rule (``adaptprune_jax.nms.adaptprune_scores``): one score vector over every grid, attention x
a centre prior on each grid's normalised coordinates (``linspace(-(size // 2), size // 2, size)``
per axis, a Gaussian of width ``prior_sigma``, divided by its maximum over the grid); valid tokens
on no grid are kept first, in index order, and count in ``keep``; invalid slots are never kept;
each pick suppresses the tokens of its own grid within ``distance_limit`` cells.
"""

from __future__ import annotations

import numpy as np

NO_GRID = -1


def reference_prior(row, col, grid, grid_rows, grid_cols, valid, sigma=12.0):
    """The centre prior of every on-grid token, float64 (N,); 0 elsewhere."""
    prior = np.zeros(len(grid))
    for grid_id in set(np.asarray(grid)[np.asarray(valid)].tolist()) - {NO_GRID}:
        members = np.flatnonzero((grid == grid_id) & valid)
        rows, cols = int(grid_rows[members[0]]), int(grid_cols[members[0]])
        x_row = np.linspace(-(rows // 2), rows // 2, rows)[row[members].astype(int)]
        x_col = np.linspace(-(cols // 2), cols // 2, cols)[col[members].astype(int)]
        weights = np.exp(-(x_row**2 + x_col**2) / (2 * sigma**2))
        prior[members] = weights / weights.max()
    return prior


def reference_adaptprune(
    attention,
    keys,
    keep,
    layout,
    prior_sigma=12.0,
    distance_limit=5.0,
    distance_sigma=1.5,
    similarity_sigma=0.05,
):
    """(selection order, margin of each pick among grid tokens: the relative gap between the pick and
    the runner-up) for one row; ``layout`` a dict of NumPy (N,) arrays of the TokenLayout fields."""
    row, col, grid = (np.asarray(layout[name], np.float64) for name in ("row", "col", "grid"))
    valid = np.asarray(layout["valid"], bool)
    on_grid = (grid != NO_GRID) & valid
    scores = np.asarray(attention, np.float64) * reference_prior(
        row, col, grid, layout["grid_rows"], layout["grid_cols"], valid, prior_sigma
    )
    unit = np.asarray(keys, np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    order = list(np.flatnonzero(valid & ~on_grid))
    candidates = on_grid.copy()
    margins = []
    while len(order) < keep:
        ranked = np.where(candidates, scores, -np.inf)
        chosen = int(np.argmax(ranked))
        runner_up = np.max(np.delete(ranked, chosen), initial=-np.inf)
        margins.append((ranked[chosen] - max(runner_up, 0.0)) / ranked[chosen])
        order.append(chosen)
        candidates[chosen] = False
        distance = np.sqrt((row - row[chosen]) ** 2 + (col - col[chosen]) ** 2)
        window = (grid == grid[chosen]) & on_grid & (distance <= distance_limit)
        factor = 1 - np.exp(-(distance**2) / (2 * distance_sigma**2)) * np.exp(
            -((1 - unit @ unit[chosen]) ** 2) / (2 * similarity_sigma**2)
        )
        scores[window] *= factor[window]
    return np.asarray(order), np.asarray(margins)
