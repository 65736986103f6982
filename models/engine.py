"""One object that answers questions about images with a LLaVA checkpoint, pruned or not.

It joins the pieces a harness needs (checkpoint loading, preprocessing, the jitted runner, decoding
of the answers) behind `answer(images, questions, pruning=...)`, so an evaluation or a demo never
touches token ids or caches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
import PIL.Image

from models.checkpoint import load_checkpoint
from models.generate import DEFAULT_LENGTH_BUCKET, LlavaRunner, SamplingConfig, tokens_until_eos
from models.layers import AUTO
from models.preprocess import Preprocessor


class Answers(NamedTuple):
    texts: list[str]
    kept: np.ndarray | None  # (B, keep) kept image-token indices (grid order), None when unpruned
    prompt_tokens: list[int]  # prompt length per question


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

    def answer(
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
    ) -> Answers:
        """Generate one answer per (image, question) pair, as one batch.

        ``seed`` drives sampling; ``row_seeds`` (one per question) seed a method that takes a seed
        row by row, so its selection for a question is the same in any batch (else it uses ``seed``).
        ``queries``: the text a method reading CLIP's joint space gives the text tower (default: the
        questions). ``stop_at_eos=False`` gives every answer exactly ``max_new_tokens`` tokens (what a
        speed measurement with random weights needs: they emit EOS by chance, not on cue).
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        prompts = [self.preprocessor.encode(question) for question in questions]
        query_ids = None
        if pruning is not None and pruning.needs_text_tower:
            query_ids = [self.preprocessor.encode_query(text) for text in (queries or questions)]
        batch = self.runner.make_batch(
            prompts,
            self.preprocessor.pixel_values(images),
            pad_token_id=self.preprocessor.pad_token_id,
            max_new_tokens=max_new_tokens,
            queries=query_ids,
        )
        eos_token_id = self.preprocessor.eos_token_id if stop_at_eos else None
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos_token_id,
            pad_token_id=self.preprocessor.pad_token_id,
        )
        pruning_keys = None
        if row_seeds is not None and pruning is not None and pruning.takes_seed:
            if len(row_seeds) != len(questions):
                raise ValueError(f"{len(row_seeds)} row seeds but {len(questions)} questions")
            pruning_keys = jax.vmap(jax.random.key)(np.asarray(row_seeds, np.uint32))
        output = self.runner.generate(
            batch, sampling, pruning=pruning, rng=jax.random.key(seed), pruning_keys=pruning_keys
        )
        ids = tokens_until_eos(output.tokens, output.num_generated, eos_token_id)
        texts = [self.preprocessor.decode(row).strip() for row in ids]
        return Answers(texts, output.kept, [len(p) for p in prompts])
