"""One object that answers questions about images with a LLaVA checkpoint (1.5 or NeXT), pruned or not.

It joins the pieces a harness needs (checkpoint loading, preprocessing, the jitted runner, decoding
of the answers) behind `answer(images, questions, pruning=...)`, so an evaluation or a demo never
touches token ids or caches.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np
import PIL.Image

from models.checkpoint import load_checkpoint
from models.generate import DEFAULT_LENGTH_BUCKET, LlavaRunner, PromptBatch, SamplingConfig, tokens_until_eos
from models.layers import AUTO
from models.preprocess import Preprocessor


class Answers(NamedTuple):
    texts: list[str]
    kept: np.ndarray | None  # (B, keep) kept image-token indices (grid order), None when unpruned
    prompt_tokens: list[int]  # prompt length per question


class PreparedBatch(NamedTuple):
    """One batch ready for the device (:meth:`LlavaEngine.prepare`)."""

    batch: PromptBatch
    sampling: SamplingConfig
    pruning: Any
    seed: int  # sampling's seed
    row_seeds: Sequence[int] | None  # a seeded method's seed per row, else None
    prompt_tokens: list[int]


class LlavaEngine:
    def __init__(self, runner: LlavaRunner, preprocessor: Preprocessor, hf_config):
        self.runner = runner
        self.preprocessor = preprocessor
        self.hf_config = hf_config
        self.config = runner.config

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike,
        *,
        dtype: str = "float32",
        length_bucket: int = DEFAULT_LENGTH_BUCKET,
        text_tower: str | os.PathLike | None = None,
        attention: str = AUTO,
        mesh: jax.sharding.Mesh | None = None,
    ) -> LlavaEngine:
        """``text_tower``: a CLIPModel directory whose text tower and visual projection a method
        reading CLIP's joint space needs (CDPruner); ``attention``: how the towers attend
        (`models.layers.ATTENTION_IMPLEMENTATIONS`; ``auto``: cuDNN on a GPU in bfloat16, einsum
        otherwise); ``mesh``: the devices to run on (`LlavaRunner`)."""
        hf_config, model = load_checkpoint(directory, dtype, text_tower, attention)
        preprocessor = Preprocessor.from_checkpoint(directory, hf_config, text_tower=text_tower)
        return cls(LlavaRunner(model, length_bucket=length_bucket, mesh=mesh), preprocessor, hf_config)

    def answer(self, images: Sequence[PIL.Image.Image], questions: Sequence[str], **options) -> Answers:
        """Generate one answer per (image, question) pair, as one batch (``options``: those of
        :meth:`prepare`)."""
        return self.run(self.prepare(images, questions, **options))

    def answer_stream(
        self, requests: Iterable[tuple[Hashable, Mapping[str, Any]]]
    ) -> Iterator[tuple[Hashable, Answers]]:
        """Answer a stream of batches, ``(tag, prepare's keyword arguments)`` each, yielding ``(tag,
        answers)`` in order. The next batch is prepared (tokenized, its images preprocessed) on a
        background thread while this one generates, so the host work hides behind the device's: the
        answers are those of :meth:`answer`, batch by batch. ``requests`` is advanced on the calling
        thread, one batch ahead of the answers."""
        requests = iter(requests)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:

            def submit_next() -> tuple[Hashable, Future] | None:
                request = next(requests, None)
                if request is None:
                    return None
                tag, options = request
                return tag, pool.submit(lambda: self.prepare(**options))

            pending = submit_next()
            while pending is not None:
                tag, future = pending
                prepared = future.result()
                pending = submit_next()
                yield tag, self.run(prepared)

    def prepare(
        self,
        images: Sequence[PIL.Image.Image],
        questions: Sequence[str],
        *,
        pruning=None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        seed: int = 0,
        row_seeds: Sequence[int] | None = None,
        queries: Sequence[str] | None = None,
        stop_at_eos: bool = True,
    ) -> PreparedBatch:
        """Everything before the device for one batch: prompts, pixels, padding, sampling settings.

        ``seed`` drives sampling; ``row_seeds`` (one per question) seed a method that takes a seed
        row by row, so its selection for a question is the same in any batch (else it uses ``seed``).
        ``queries``: the text a method reading CLIP's joint space gives the text tower (default: the
        questions). ``stop_at_eos=False`` gives every answer exactly ``max_new_tokens`` tokens (what a
        speed measurement with random weights needs: they emit EOS by chance, not on cue).
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if row_seeds is not None and len(row_seeds) != len(questions):
            raise ValueError(f"{len(row_seeds)} row seeds but {len(questions)} questions")
        image_sizes = self.preprocessor.image_sizes(images) if self.config.anyres else None
        prompts = [
            self.preprocessor.encode(question, None if image_sizes is None else image_sizes[row])
            for row, question in enumerate(questions)
        ]
        query_ids = None
        if pruning is not None and pruning.needs_text_tower:
            query_ids = [self.preprocessor.encode_query(text) for text in (queries or questions)]
        batch = self.runner.make_batch(
            prompts,
            self.preprocessor.pixel_values(images),
            pad_token_id=self.preprocessor.pad_token_id,
            max_new_tokens=max_new_tokens,
            queries=query_ids,
            image_sizes=image_sizes,
        )
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=self.preprocessor.eos_token_id if stop_at_eos else None,
            pad_token_id=self.preprocessor.pad_token_id,
        )
        if row_seeds is None or pruning is None or not pruning.takes_seed:
            row_seeds = None
        return PreparedBatch(batch, sampling, pruning, seed, row_seeds, [len(p) for p in prompts])

    def run(self, prepared: PreparedBatch) -> Answers:
        """Generate a prepared batch on the device and decode its answers to text."""
        pruning_keys = None
        if prepared.row_seeds is not None:
            pruning_keys = jax.vmap(jax.random.key)(np.asarray(prepared.row_seeds, np.uint32))
        output = self.runner.generate(
            prepared.batch,
            prepared.sampling,
            pruning=prepared.pruning,
            rng=jax.random.key(prepared.seed),
            pruning_keys=pruning_keys,
        )
        eos_token_id = prepared.sampling.eos_token_id
        ids = tokens_until_eos(output.tokens, output.num_generated, eos_token_id)
        texts = [self.preprocessor.decode(row).strip() for row in ids]
        return Answers(texts, output.kept, prepared.prompt_tokens)
