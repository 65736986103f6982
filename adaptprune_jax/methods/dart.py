"""DART: duplication-aware pruning inside the LLM. A few pivot tokens are chosen by key norm, and each
pivot keeps the image tokens least similar to it.

What the released code (ZichenWen1/DART, ``modeling_llama_self.py``, ``get_retained_image_token``)
does before decoder layer K (2), and this file reproduces:
1. Pivots: the ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` tokens after the
   image with the largest L1 norm of layer K - 1's post-RoPE keys (all query heads, grouped-query
   keys repeated per head).
2. The pivots go into a Python ``set`` (image pivots first, each group in descending norm) and are
   processed in that set's iteration order. Each pivot takes, from the image tokens not yet taken
   (image pivots excluded), the ``per_pivot`` with the lowest cosine similarity to it, computed on
   layer K - 1's output passed through the LLM's final norm. The order matters (a token taken by one
   pivot is gone for the next), so ``set_iteration_order`` computes CPython's order from the values.
3. The LLM keeps the image pivots and every taken token (text pivots only choose), at their original
   positions.

Budgets: the released code takes a budget b and keeps ``pivot_image_tokens + pivots * (b // pivots)``
(68 for b = 64). Here ``keep`` is the count the LLM sees, as for every method: ``per_pivot = (keep -
pivot_image_tokens) // pivots``, and when that leaves a remainder the first pivots in processing order
take one token more (our extension; keep = 68, 132, 196 are the released budgets 64, 128, 192 exactly).
Released code runs batch 1 with every image token valid; here rows are independent and padding slots
are never taken.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, LayerView, PruneConfig, check_int, resolve_keep
from adaptprune_jax.nms import SIMILARITY_PRECISION, l2_normalize

# CPython's set implementation (Objects/setobject.c): a power-of-two table, probing up to 9 further
# slots linearly, then a perturbed jump; it grows to 4x its size in use when 3/5 full.
_SET_MIN_SIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


def _set_table_sizes(count: int) -> list[int]:
    """The table size after each of ``count`` insertions of distinct keys into an empty set."""
    sizes, size = [], _SET_MIN_SIZE
    for fill in range(1, count + 1):
        if fill * 5 >= (size - 1) * 3:
            size = _SET_MIN_SIZE
            while size <= fill * 4:
                size <<= 1
        sizes.append(size)
    return sizes


def _insert(table: jax.Array, key: jax.Array, entry: jax.Array, size: int | jax.Array) -> jax.Array:
    """Put ``entry`` in the slot CPython's probing finds for the non-negative int ``key`` (its own
    hash) in the first ``size`` slots of ``table`` (-1 = empty)."""
    mask = size - 1
    window = jnp.arange(_LINEAR_PROBES + 1)

    def probe(state):
        start, perturb, _ = state
        slots = jnp.where(start + _LINEAR_PROBES <= mask, start + window, start)
        free = table[slots] < 0
        found = jnp.where(jnp.any(free), slots[jnp.argmax(free)], -1)
        perturb = perturb >> _PERTURB_SHIFT
        return (start * 5 + 1 + perturb) & mask, perturb, found

    start = key & mask
    _, _, slot = lax.while_loop(lambda state: state[2] < 0, probe, (start, key, jnp.asarray(-1)))
    return table.at[slot].set(entry)


def set_iteration_order(keys: jax.Array) -> jax.Array:
    """The order in which ``list(set(keys))`` lists distinct non-negative ints, as indices into ``keys``
    (last axis; batched over the others). Negative keys (padding) are read as 0, so probing ends.

    The insertions run as one loop over a table of the largest size the set reaches (its size before
    and after each insertion a static schedule), so a program compiles one insertion and one resize,
    not one per key."""
    keys = jnp.maximum(keys, 0)
    count = keys.shape[-1]
    sizes = _set_table_sizes(count)
    capacity = max(sizes)
    sizes_before = jnp.asarray([_SET_MIN_SIZE, *sizes[:-1]], jnp.int32)
    sizes_after = jnp.asarray(sizes, jnp.int32)

    def one_row(row):
        row = row.astype(jnp.int32)

        def resized(old, new_size):
            """A resize: the entries re-inserted in slot order into an empty table of ``new_size``."""

            def reinsert(slot, table):
                entry = old[slot]
                return lax.cond(
                    entry >= 0,
                    lambda t: _insert(t, row[jnp.maximum(entry, 0)], entry, new_size),
                    lambda t: t,
                    table,
                )

            return lax.fori_loop(0, capacity, reinsert, jnp.full_like(old, -1))

        def insert_next(index, table):
            size, new_size = sizes_before[index], sizes_after[index]
            table = _insert(table, row[index], index, size)
            return lax.cond(new_size != size, resized, lambda t, _: t, table, new_size)

        table = lax.fori_loop(0, count, insert_next, jnp.full((capacity,), -1, jnp.int32))
        order = jnp.argsort(jnp.where(table >= 0, jnp.arange(capacity), capacity), stable=True)
        return table[order[:count]]

    flat = keys.reshape(-1, count)
    return jax.vmap(one_row)(flat).reshape(keys.shape)


@register
@dataclasses.dataclass(frozen=True)
class DARTConfig(PruneConfig):
    """DART's settings: the pivot counts (released: 4 and 4) and the layer K (2)."""

    name: ClassVar[str] = "dart"
    has_torch_reference: ClassVar[bool] = True
    reference_cues: ClassVar[tuple[str, ...]] = ("layer_keys", "normed_hidden", "image_positions")
    reference_options: ClassVar[tuple[str, ...]] = ("pivot_image_tokens", "pivot_text_tokens")

    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def __post_init__(self):
        super().__post_init__()
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            check_int(name, getattr(self, name))
        if self.pivot_image_tokens < 0 or self.pivot_text_tokens < 0 or not self.pivots:
            raise ValueError(
                "dart needs pivot_image_tokens >= 0 and pivot_text_tokens >= 0, not both 0; got "
                f"{self.pivot_image_tokens} and {self.pivot_text_tokens}."
            )

    @property
    def pivots(self) -> int:
        return self.pivot_image_tokens + self.pivot_text_tokens

    def cue_requests(self):
        return (LayerView(final_norm=True),)

    def resolve_keep(self, num_image_tokens: int) -> int:
        keep = resolve_keep(self.keep, num_image_tokens)
        if keep < self.pivot_image_tokens:
            raise ValueError(
                f"dart keeps its {self.pivot_image_tokens} image pivots, so keep={keep} is too small: "
                f"allowed {self.pivot_image_tokens}..{num_image_tokens}."
            )
        return keep

    def per_pivot(self, keep: int) -> list[int]:
        """How many image tokens each pivot takes, in processing order."""
        share, extra = divmod(keep - self.pivot_image_tokens, self.pivots)
        return [share + (p < extra) for p in range(self.pivots)]

    def select(self, cues: Cues, keep: int) -> jax.Array:
        view = cues.require("view", self.name)
        batch, num_image = view.image_slots.shape
        valid = cues.valid()
        valid = jnp.ones((batch, num_image), bool) if valid is None else valid
        groups = view.queries.shape[2] // view.keys.shape[2]
        norms = groups * jnp.sum(jnp.abs(view.keys.astype(jnp.float32)), axis=(2, 3))  # (B, S)
        image_norms = jnp.take_along_axis(norms, view.image_slots, axis=1)
        _, image_pivots = lax.top_k(jnp.where(valid, image_norms, -jnp.inf), self.pivot_image_tokens)

        slots = jnp.arange(norms.shape[1])
        last_image_slot = jnp.max(jnp.where(valid, view.image_slots, -1), axis=1, keepdims=True)
        after_image = (slots[None] > last_image_slot) & (view.positions >= 0)
        _, text_pivots = lax.top_k(jnp.where(after_image, norms, -jnp.inf), self.pivot_text_tokens)

        pivot_slots = jnp.concatenate(
            [jnp.take_along_axis(view.image_slots, image_pivots, axis=1), text_pivots], axis=1
        )
        order = set_iteration_order(jnp.take_along_axis(view.positions, pivot_slots, axis=1))
        pivot_slots = jnp.take_along_axis(pivot_slots, order, axis=1)

        unit = l2_normalize(view.hidden.astype(jnp.float32))
        image_unit = jnp.take_along_axis(unit, view.image_slots[..., None], axis=1)
        pivot_unit = jnp.take_along_axis(unit, pivot_slots[..., None], axis=1)
        similarity = jnp.einsum("bpd,bnd->bpn", pivot_unit, image_unit, precision=SIMILARITY_PRECISION)

        rows = jnp.arange(batch)[:, None]
        taken = jnp.zeros((batch, num_image), bool).at[rows, image_pivots].set(True)
        pool = valid & ~taken
        for pivot, count in enumerate(self.per_pivot(keep)):
            if count:
                _, picks = lax.top_k(jnp.where(pool, -similarity[:, pivot], -jnp.inf), count)
                pool = pool.at[rows, picks].set(False)
                taken = taken.at[rows, picks].set(True)
        _, kept = lax.top_k(jnp.where(taken, -jnp.arange(num_image), -num_image - 1), keep)
        return jnp.sort(kept, axis=1).astype(jnp.int32)

    def torch_reference_order(self, cues, keep, grid):
        """The released loop for one prompt, Python sets included: ``layer_keys`` (S, H * D) layer
        K - 1's post-RoPE keys per query head, ``normed_hidden`` (S, d) its output after the final
        norm, ``image_positions`` (N,) the image tokens' sequence positions (ascending)."""
        import torch
        import torch.nn.functional as F

        keys, hidden = cues["layer_keys"], cues["normed_hidden"]
        positions = cues["image_positions"].long()
        start, length = int(positions[0]), positions.numel()
        image_norms = torch.norm(keys[start : start + length], p=1, dim=-1)
        text_norms = torch.norm(keys[start + length :], p=1, dim=-1)
        image_indices = (image_norms.topk(self.pivot_image_tokens).indices + start).tolist()
        query_indices = (text_norms.topk(self.pivot_text_tokens).indices + start + length).tolist()
        indices_set = set(image_indices + query_indices)
        valid_indices = set(range(start, start + length)) - set(image_indices)
        for item, count in zip(list(indices_set), self.per_pivot(keep)):
            valid_indices_list = list(valid_indices)
            similarity = -F.cosine_similarity(hidden[item, :], hidden[valid_indices_list, :], dim=-1)
            picks = [valid_indices_list[i] for i in similarity.topk(count).indices]
            indices_set.update(picks)
            valid_indices.difference_update(picks)
        indices_set.difference_update(query_indices)
        return torch.tensor(sorted(indices_set)) - start
