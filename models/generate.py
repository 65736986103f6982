"""Jitted generation: one prefill call (vision + LLM + optional pruning) and one decode loop.

The model is split once (`nnx.split`) and plain `jax.jit` functions merge it inside, so no Python
object graph is walked per call. The weights travel as one flat tuple of arrays (`LlavaRunner.weights`),
not as the nnx.State: JAX flattens a tuple of arrays in C++, while the State's nested Python-registered
nodes cost host time on every call (measured by `experiments.benchmark.dispatch_overhead`). At batch 1
that is latency. Prompts are right-padded to a multiple of `length_bucket`, so the prefill compiles once per
bucket, not once per prompt length. The decode loop is a `lax.while_loop` inside jit (one dispatch for
all new tokens) carrying the KV cache, which is donated. On a mesh (`models.sharding`) the weights and
caches carry their shardings into both programs and every batch is split over the `data` axis.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import adaptprune_jax as prune
from models import anyres as anyres_lib
from models import sharding
from models.clip_text import batch_segments
from models.llava import LlavaForConditionalGeneration, check_anyres_method

DEFAULT_LENGTH_BUCKET = 64
# LLaVA-NeXT rows carry different image-token counts; a batch gives each row this many slots, rounded
# up to a multiple of the bucket (at most the most any image takes), so a new aspect ratio rarely
# compiles a new prefill.
DEFAULT_IMAGE_TOKEN_BUCKET = 256


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are drawn. temperature 0 = greedy. eos_token_id None = never stop early."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    eos_token_id: int | None = None
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


class PromptBatch(NamedTuple):
    input_ids: np.ndarray  # (B, S_bucket) int32, right-padded
    lengths: np.ndarray  # (B,) int32
    pixel_values: np.ndarray  # (B, 3, H, W) float32
    # The questions in the CLIP text tower's tokens, as segments (B, M, L) (for a method that reads
    # them, ``needs_text_tower``); M is a power of two, so question lengths rarely recompile.
    query_ids: np.ndarray | None = None
    query_mask: np.ndarray | None = None
    # LLaVA-NeXT: pixel_values are crops (B, C, 3, H, W), packed into the image slots by this index and
    # layout (B, N) (`models.anyres.pack_images`).
    image_index: np.ndarray | None = None
    image_layout: prune.TokenLayout | None = None


class GenerationOutput(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32, pad after EOS
    num_generated: np.ndarray  # (B,) tokens up to and including EOS
    kept: np.ndarray | None  # (B, keep) kept image-token indices (into the image span), or None


def bucket_length(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket


def pad_prompts(
    token_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    image_token_index: int,
    num_image_tokens: int | Sequence[int],
    length_bucket: int = DEFAULT_LENGTH_BUCKET,
    max_total_length: int | None = None,
    max_new_tokens: int = 0,
    image_slots: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts to a shared bucketed length; check each holds exactly one contiguous image span.

    num_image_tokens: the span's length, one for every row or one per row (LLaVA-NeXT); image_slots:
    the image slots the batch gives every row (default: the most any row has). A pruned row keeps its
    text in the slots beyond them (`models.pruning`), so the width holds every row's text plus them.
    max_total_length: the longest sequence the cache may hold (prompt + new tokens); a longer request
    is refused here, with the numbers, rather than silently truncated.
    """
    if not token_ids:
        raise ValueError("no prompts given")
    lengths = np.array([len(ids) for ids in token_ids], np.int32)
    counts = np.broadcast_to(np.asarray(num_image_tokens, np.int32), lengths.shape)
    for row, (ids, count) in enumerate(zip(token_ids, counts)):
        where = np.flatnonzero(np.asarray(ids) == image_token_index)
        if where.size != count or (where.size and where[-1] - where[0] + 1 != where.size):
            raise ValueError(
                f"prompt {row} must contain one contiguous run of {count} image tokens "
                f"(id {image_token_index}); found {where.size}"
            )
    longest = int(lengths.max())
    if max_total_length is not None and longest + max_new_tokens > max_total_length:
        raise ValueError(
            f"prompt too long for the cache: {longest} prompt tokens + {max_new_tokens} new tokens "
            f"> {max_total_length} positions"
        )
    image_slots = int(counts.max()) if image_slots is None else image_slots
    width = bucket_length(int((lengths - counts).max()) + image_slots, length_bucket)
    if max_total_length is not None:
        width = min(width, max_total_length - max_new_tokens)
    input_ids = np.full((len(token_ids), width), pad_token_id, np.int32)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = ids
    return input_ids, lengths


class LlavaRunner:
    """Jitted prefill and generation over a split model. `trace_counts` counts compilations per function."""

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        *,
        length_bucket: int = DEFAULT_LENGTH_BUCKET,
        image_token_bucket: int = DEFAULT_IMAGE_TOKEN_BUCKET,
        donate_caches: bool | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """``donate_caches``: let the decode loop update the prompt's caches in place (default: where
        the backend can, not on the CPU, which would warn). ``mesh``: the (data, model) mesh to run on
        (`models.sharding.make_mesh`): weights and caches sharded by `models.sharding`'s table, each
        batch's rows split over `data` (a batch is padded to a multiple of it and the padding rows'
        outputs dropped); None: the default device."""
        self.mesh = mesh
        if mesh is not None:
            model = sharding.prepare_model(model, mesh)
        self.config = model.config
        self.graphdef, state = nnx.split(model)
        with_paths, self._state_def = jax.tree_util.tree_flatten_with_path(state)
        self._weight_shardings = None if mesh is None else sharding.weight_shardings(state, mesh)
        self.weights: tuple = self._place(tuple(leaf for _, leaf in with_paths))
        self._weight_specs = [
            (jax.tree_util.keystr(path), leaf.shape, jnp.dtype(leaf.dtype)) for path, leaf in with_paths
        ]
        self.length_bucket = length_bucket
        self.image_token_bucket = image_token_bucket
        joint_space = model.joint_space
        self.segment_length = None if joint_space is None else joint_space.cfg.text.max_position_embeddings
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("extra_slots", "pruning", "all_logits"))
        if donate_caches is None:
            donate_caches = jax.default_backend() != "cpu"
        donate = ("caches",) if donate_caches else ()
        self._generate = jax.jit(self._generate_impl, static_argnames=("sampling",), donate_argnames=donate)

    @property
    def prefill_program(self):
        """The jitted prefill `(weights, input_ids, lengths, pixel_values, rng, query_ids, query_mask,
        image_index=None, image_layout=None, *, extra_slots, pruning, all_logits)` -> PrefillResult, for callers (the benchmark's pre-compile
        phase) that compile it from abstract shapes before `generate` runs it."""
        return self._prefill

    @property
    def decode_loop(self):
        """The jitted decode loop `(weights, first_logits, caches, next_positions, rng, *, sampling)` ->
        (tokens, counts, caches), for callers (the benchmark) that compile and time it stage by stage.
        On GPU and TPU the caches passed in are donated (updated in place): pass each call its own."""
        return self._generate

    # --- weights: a flat tuple outside jit, the model inside -------------------------------------
    @property
    def state(self) -> nnx.State:
        """The weights as an nnx.State (paths and all), rebuilt from `weights`."""
        return jax.tree_util.tree_unflatten(self._state_def, self.weights)

    @state.setter
    def state(self, state: nnx.State | None) -> None:
        """Swap in other weights of the same structure (compiled functions are reused); None drops them."""
        self.weights = None if state is None else self.flatten_weights(state)

    def flatten_weights(self, state: nnx.State) -> tuple:
        """A state of this model's structure (e.g. fresh random weights) as the flat tuple jit takes,
        on this runner's devices (a state from `state` is in this runner's layout: on a model axis,
        fused projections in blocks)."""
        leaves, treedef = jax.tree_util.tree_flatten(state)
        if treedef != self._state_def:
            raise ValueError(
                "the state's structure differs from this runner's model (other config or preset?)"
            )
        for leaf, (path, shape, dtype) in zip(leaves, self._weight_specs):
            if leaf.shape != shape or jnp.dtype(leaf.dtype) != dtype:
                raise ValueError(
                    f"weight {path} is {jnp.dtype(leaf.dtype).name}{list(leaf.shape)}; this runner's "
                    f"model has {dtype.name}{list(shape)}"
                )
        return self._place(tuple(leaves))

    def _place(self, weights: tuple) -> tuple:
        """Weights on this runner's mesh, each with its sharding (as they are without a mesh)."""
        if self.mesh is None:
            return weights
        host = jax.process_count() > 1  # a multi-process sharding is filled from the same host values
        return tuple(
            jax.device_put(np.asarray(weight) if host else weight, where)
            for weight, where in zip(weights, self._weight_shardings)
        )

    def on_mesh(self):
        """The context the jitted programs run in (`jax.set_mesh`: kernels that are not partitioned
        automatically, the Pallas NMS, find the mesh there); nothing without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def constrain_caches(self, caches):
        """Layer caches held as `models.sharding` lays them out on this runner's mesh (split by KV head,
        rows over data), inside jit; unchanged without a mesh. Public for callers that compile the
        prefill stage by stage (the benchmark), so their caches are laid out as this runner's are."""
        if self.mesh is None:
            return caches
        return sharding.constrain(caches, sharding.cache_shardings(caches, self.mesh))

    def merge(self, weights: tuple) -> LlavaForConditionalGeneration:
        """The model from a flat weight tuple (call inside jit: merging is trace-time work)."""
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self._state_def, weights))

    # --- jitted bodies -------------------------------------------------------------------------
    def _prefill_impl(
        self,
        weights,
        input_ids,
        lengths,
        pixel_values,
        rng,
        query_ids,
        query_mask,
        image_index=None,
        image_layout=None,
        *,
        extra_slots,
        pruning,
        all_logits,
    ):
        self.trace_counts["prefill"] += 1  # runs only while tracing
        model = self.merge(weights)
        result = model.prefill(
            input_ids,
            lengths,
            pixel_values,
            extra_slots=extra_slots,
            pruning=pruning,
            rng=rng,
            all_logits=all_logits,
            query_ids=query_ids,
            query_mask=query_mask,
            image_index=image_index,
            image_layout=image_layout,
        )
        return result._replace(caches=self.constrain_caches(result.caches))

    def _generate_impl(self, weights, first_logits, caches, next_positions, rng, *, sampling: SamplingConfig):
        self.trace_counts["generate"] += 1
        language_model = self.merge(weights).language_model
        batch = first_logits.shape[0]
        eos = -1 if sampling.eos_token_id is None else sampling.eos_token_id

        def draw(logits, key):
            if sampling.temperature == 0.0:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jax.random.categorical(key, logits / sampling.temperature, axis=-1).astype(jnp.int32)

        rng, key = jax.random.split(rng)
        first = draw(first_logits, key)
        tokens = (
            jnp.full((batch, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32).at[:, 0].set(first)
        )
        done = first == eos

        def keep_going(carry):
            step, _, _, _, done, _ = carry
            return (step < sampling.max_new_tokens) & ~jnp.all(done)

        def step_once(carry):
            step, tokens, current, caches, done, rng = carry
            logits, caches = language_model.decode(current, next_positions + step - 1, caches)
            caches = self.constrain_caches(caches)
            rng, key = jax.random.split(rng)
            token = jnp.where(done, sampling.pad_token_id, draw(logits, key))
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
            return step + 1, tokens, token, caches, done | (token == eos), rng

        carry = (jnp.asarray(1, jnp.int32), tokens, first, caches, done, rng)
        step, tokens, _, caches, _, _ = jax.lax.while_loop(keep_going, step_once, carry)
        # A row's count ends at its EOS or at the last step: a generated token that happens to equal the
        # pad id is still an answer token (random weights emit any id).
        is_eos = tokens == eos
        counts = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, step)
        # The final caches are returned so the donated input caches alias them: the loop then updates
        # the prompt's caches in place instead of holding a second copy for the whole decode.
        return tokens, counts, caches

    # --- public API ----------------------------------------------------------------------------
    def prefill(self, batch: PromptBatch, *, extra_slots: int = 0, pruning=None, rng=None, all_logits=False):
        """The jitted prefill of ``batch``; ``rng`` one key, or one per row (B,)."""
        rows = batch.input_ids.shape[0]
        result = self._prefill_rows(batch, extra_slots, pruning, rng, all_logits)
        if result.logits.shape[0] == rows:
            return result
        return jax.tree_util.tree_map(lambda x: x[:rows] if x.ndim else x, result)  # padding rows cut

    def _prefill_rows(self, batch: PromptBatch, extra_slots, pruning, rng, all_logits):
        """`prefill` of ``batch`` padded to a multiple of the data axis (padding rows left in)."""
        self.resolve_keep(pruning, batch.image_layout)
        rng = jax.random.key(0) if rng is None else rng
        batch, rng = self._pad_rows(batch, rng)
        with self.on_mesh():
            return self._prefill(
                self.weights,
                self.put(batch.input_ids),
                self.put(batch.lengths),
                self.put(batch.pixel_values),
                self.put(rng) if rng.ndim else rng,
                None if batch.query_ids is None else self.put(batch.query_ids),
                None if batch.query_mask is None else self.put(batch.query_mask),
                None if batch.image_index is None else self.put(batch.image_index),
                None if batch.image_layout is None else jax.tree.map(self.put, batch.image_layout),
                extra_slots=extra_slots,
                pruning=pruning,
                all_logits=all_logits,
            )

    def _pad_rows(self, batch: PromptBatch, rng: jax.Array) -> tuple[PromptBatch, jax.Array]:
        """``batch`` (and per-row keys ``rng``) with copies of its first row appended up to a multiple
        of the data axis: every device gets the same number of rows."""
        extra = -batch.input_ids.shape[0] % sharding.axis_size(self.mesh, sharding.DATA)
        if not extra:
            return batch, rng
        if batch.image_index is not None:
            raise ValueError(
                f"a LLaVA-NeXT batch of {batch.input_ids.shape[0]} rows on a data axis of "
                f"{sharding.axis_size(self.mesh, sharding.DATA)}: its packing index addresses the batch's "
                "own crops, so give it a multiple of the data axis rows"
            )

        def pad(x):
            return np.concatenate([x, np.repeat(x[:1], extra, axis=0)])

        batch = PromptBatch(*(None if x is None else pad(np.asarray(x)) for x in batch))
        if rng.ndim:
            rng = jnp.concatenate([rng, jnp.repeat(rng[:1], extra, axis=0)])
        return batch, rng

    def put(self, x):
        """A batch array on the devices: rows over the data axis on a mesh (its row count a multiple of
        it: `prefill` pads to one); without a mesh, on the default device."""
        if self.mesh is None:
            return jnp.asarray(x)
        if isinstance(x, jax.Array) and jax.process_count() == 1:
            return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(self.put(np.asarray(jax.random.key_data(x))))  # per-row keys
        return jax.device_put(np.asarray(x), sharding.batch_sharding(self.mesh, np.ndim(x)))

    def resolve_keep(self, pruning, layout: prune.TokenLayout | None = None) -> int:
        """Validate a pruning config against this model (a LLaVA-NeXT model: against the batch's
        image-token ``layout``); the number of image tokens the LLM finally keeps (0 when unpruned)."""
        if pruning is None:
            return 0
        if not self.config.anyres:
            pruning.validate(
                self.config.num_image_tokens, self.config.text.num_layers, self.config.image_layout()
            )
            return pruning.resolve_keep(self.config.num_image_tokens)
        check_anyres_method(pruning)
        if isinstance(pruning.keep, float):
            raise ValueError(
                f"{pruning.name}: keep={pruning.keep} is a ratio, but LLaVA-NeXT images differ in their "
                "image-token counts: give keep as a count of image tokens the LLM keeps"
            )
        if layout is None:
            return pruning.resolve_keep(self.config.num_image_tokens)  # the batch is checked when it comes
        counts = np.asarray(layout.valid).sum(axis=-1)
        pruning.validate(layout.num_tokens, self.config.text.num_layers, layout)
        keep = pruning.resolve_keep(layout.num_tokens)
        for row, count in enumerate(counts):
            if keep > count:
                raise ValueError(
                    f"{pruning.name}: keep={keep} exceeds the {count} image tokens of row {row}; on "
                    f"LLaVA-NeXT keep must be at most every row's image-token count"
                )
        return keep

    def generate(
        self,
        batch: PromptBatch,
        sampling: SamplingConfig,
        *,
        pruning=None,
        rng: jax.Array | None = None,
        pruning_keys: jax.Array | None = None,
    ) -> GenerationOutput:
        """Prefill and decode one batch. ``pruning_keys`` (B,) gives a seeded method one key per row
        (so a row's selection does not depend on its batch); else it draws from ``rng``."""
        rng = jax.random.key(0) if rng is None else rng
        prefill_rng, sample_rng = jax.random.split(rng)
        if pruning_keys is not None:
            prefill_rng = pruning_keys
        rows = batch.input_ids.shape[0]
        result = self._prefill_rows(batch, sampling.max_new_tokens, pruning, prefill_rng, False)
        with self.on_mesh():
            tokens, counts, _ = self._generate(
                self.weights,
                result.logits,
                result.caches,
                result.next_positions,
                sample_rng,
                sampling=sampling,
            )
        kept = None if result.kept is None else sharding.to_host(result.kept)[:rows]
        return GenerationOutput(sharding.to_host(tokens)[:rows], sharding.to_host(counts)[:rows], kept)

    def make_batch(
        self,
        token_ids: Sequence[Sequence[int]],
        pixel_values: np.ndarray,
        *,
        pad_token_id: int,
        max_new_tokens: int = 0,
        queries: Sequence[Sequence[int]] | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> PromptBatch:
        """``queries``: each prompt's question in the CLIP text tower's tokens, for a method that
        reads it (the model must have the text tower). LLaVA-NeXT: ``pixel_values`` are the crops
        (B, C, 3, H, W) and ``image_sizes`` (B, 2) the images' (height, width), as transformers'
        processor gives them; each row's prompt holds its own image's token count."""
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.shape[0] != len(token_ids):
            raise ValueError(f"{len(token_ids)} prompts but {pixel_values.shape[0]} images")
        if self.config.anyres and pixel_values.ndim != 5:
            raise ValueError(
                f"a LLaVA-NeXT batch needs crops (B, C, 3, H, W), got pixel_values {pixel_values.shape}"
            )
        input_ids, lengths, packed = self.pad_batch(
            token_ids, image_sizes, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens
        )
        anyres = {}
        if packed is not None:
            crops = anyres_lib.max_crops(self.config)
            pixel_values = np.pad(pixel_values, [(0, 0), (0, crops - pixel_values.shape[1])] + [(0, 0)] * 3)
            anyres = dict(image_index=packed.index, image_layout=packed.layout)
        if queries is None:
            return PromptBatch(input_ids, lengths, pixel_values, **anyres)
        if self.segment_length is None:
            raise ValueError(
                "queries need the CLIP text tower, which this model was loaded without "
                "(load_checkpoint(..., text_tower=DIR))"
            )
        if len(queries) != len(token_ids):
            raise ValueError(f"{len(token_ids)} prompts but {len(queries)} queries")
        query_ids, query_mask = batch_segments(queries, self.segment_length)
        padding = ((0, 0), (0, (1 << (query_ids.shape[1] - 1).bit_length()) - query_ids.shape[1]), (0, 0))
        query_ids, query_mask = np.pad(query_ids, padding), np.pad(query_mask, padding)
        return PromptBatch(input_ids, lengths, pixel_values, query_ids, query_mask, **anyres)

    def pad_batch(
        self,
        token_ids: Sequence[Sequence[int]],
        image_sizes: Sequence[Sequence[int]] | None = None,
        *,
        pad_token_id: int,
        max_new_tokens: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, anyres_lib.PackedImages | None]:
        """`make_batch`'s padded prompts, lengths and LLaVA-NeXT packing (None for LLaVA-1.5), without
        the pixels: they decide which prefill program a batch runs, so a caller can tell the programs
        a workload needs before it has the pixels (the benchmark warms and compiles each one)."""
        packed = self._pack(len(token_ids), image_sizes)
        input_ids, lengths = pad_prompts(
            token_ids,
            pad_token_id=pad_token_id,
            image_token_index=self.config.image_token_index,
            num_image_tokens=self.config.num_image_tokens if packed is None else packed.counts,
            length_bucket=self.length_bucket,
            max_total_length=self.config.text.max_position_embeddings,
            max_new_tokens=max_new_tokens,
            image_slots=None if packed is None else packed.layout.num_tokens,
        )
        return input_ids, lengths, packed

    def _pack(self, rows: int, image_sizes) -> anyres_lib.PackedImages | None:
        """LLaVA-NeXT's packing of a batch of ``rows`` (None for LLaVA-1.5): the crops padded to the
        most any image takes (one vision program per model), the image slots to the image-token bucket."""
        if not self.config.anyres:
            if image_sizes is not None:
                raise ValueError(
                    "image_sizes are for LLaVA-NeXT (anyres) models; this one takes one crop per image"
                )
            return None
        if image_sizes is None or len(image_sizes) != rows:
            raise ValueError(
                f"a LLaVA-NeXT batch needs one (height, width) image size per row: {rows} rows, "
                f"{'no' if image_sizes is None else len(image_sizes)} image sizes"
            )
        counts = [anyres_lib.image_token_count(size, self.config) for size in image_sizes]
        slots = min(bucket_length(max(counts), self.image_token_bucket), self.config.num_image_tokens)
        return anyres_lib.pack_images(image_sizes, self.config, anyres_lib.max_crops(self.config), slots)


def tokens_until_eos(tokens: np.ndarray, counts: np.ndarray, eos_token_id: int | None) -> list[list[int]]:
    """Per row, the generated ids without padding and without the EOS token."""
    rows = []
    for row, count in zip(tokens, counts):
        ids = [int(t) for t in row[:count]]
        if ids and eos_token_id is not None and ids[-1] == eos_token_id:
            ids = ids[:-1]
        rows.append(ids)
    return rows
