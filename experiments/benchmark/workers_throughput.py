"""The throughput workers: questions per second of the answer path an evaluation runs, timed over
warm batches of the run's workload (`experiments.benchmark.workload`).

- JAX: `models.engine.LlavaEngine.answer`, what the eval harness calls per batch (tokenize, image
  preprocessing through transformers' image processor, pad to the length bucket, one jitted prefill
  with the method and one decode loop, decode to text). The stages are timed by wrapping the
  engine's preprocessor and runner methods on the instance; the path itself is unchanged.
- PyTorch: transformers' LlavaProcessor or LlavaNextProcessor (the same image processor and
  tokenizer, prompts left-padded) and LlavaForConditionalGeneration / LlavaNextForConditionalGeneration
  .generate (sdpa, greedy), then batch_decode: how lmms-eval and the released PyTorch codes answer,
  one question at a time or batched.

LLaVA-1.5 gives every image the same image tokens; LLaVA-NeXT keeps each photo's aspect ratio, so
each question's prompt holds its own image's count and a batch pads its rows to the most of them (the
engine's image slots). A budget (keep) is the image tokens the LLM keeps of each row.

Both generate exactly `answer_tokens` new tokens per question (JAX: no stop at EOS; PyTorch:
min_new_tokens = max_new_tokens): random weights emit EOS by chance, not after a short answer.
The first batch compiles (JAX) or warms the kernels (PyTorch) and is timed apart; in JAX the first
timed batch of every other prefill program (prompt-length bucket; LLaVA-NeXT: image slots, and
whether every slot is filled) is warmed too, so no timed batch compiles.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any, NamedTuple

import numpy as np

from experiments.benchmark.workers import configure_jax, llava_hf_config, memory_stats, method_settings
from experiments.benchmark.workload import (
    Workload,
    batch_indices,
    build_workload,
    timed_batch_count,
    word_tokenizer,
)

STAGES = ("preprocess", "generate", "detokenize")
EXAMPLE_ANSWERS = 3


class StageClock:
    """Seconds spent in each stage of the calls it wraps, since the last `reset`."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    def wrap(self, stage: str, function, on_result=None):
        """``function``, its time added to ``stage``; ``on_result`` sees each result (the engine's
        generation outputs, whose token counts the row reports)."""

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds[stage] += time.perf_counter() - start
            if on_result is not None:
                on_result(result)
            return result

        return timed_call


def rate_summary(batch: int, batch_seconds: list[float], stage_seconds: list[dict]) -> dict:
    """Questions per second of timed batches of ``batch`` questions: over the whole timed run (the
    mean rate a researcher waits for) and at the median batch; the mean ms per question of each
    stage (what is left beside the named stages is ``other``)."""
    total = sum(batch_seconds)
    questions = batch * len(batch_seconds)
    stages = {stage: sum(s.get(stage, 0.0) for s in stage_seconds) for stage in STAGES}
    stages["other"] = max(total - sum(stages.values()), 0.0)
    return {
        "timed_batches": len(batch_seconds),
        "timed_questions": questions,
        "timed_s": total,
        "questions_per_s": questions / total,
        "questions_per_s_median_batch": batch / statistics.median(batch_seconds),
        "ms_per_question": 1e3 * total / questions,
        "stage_ms_per_question": {stage: 1e3 * s / questions for stage, s in stages.items()},
        "batch_ms": [round(1e3 * s, 3) for s in batch_seconds],
    }


class JobWork(NamedTuple):
    """What one job answers: the model's config, the run's workload, the tokenizer and image processor
    both frameworks use, warm-up batch 0, timed batches 1..T."""

    hf_config: Any
    workload: Workload
    tokenizer: Any
    image_processor: Any
    warmup: list[int]
    timed: list[list[int]]


def job_work(spec) -> JobWork:
    """The job's work, from the settings every worker of the run shares. A preset gets a word-level
    tokenizer over the prompts and the image processor llava-hf saves for its kind (LLaVA-1.5's pad
    to square, LLaVA-NeXT's anyres crops); a checkpoint directory its own, as the eval harness loads
    them."""
    from models import presets
    from models.preprocess import Preprocessor, build_prompt

    hf_config = llava_hf_config(spec["model"])
    workload = build_workload(spec["distinct_questions"], spec["seed"])
    if spec["model"] in presets.PRESET_NAMES:
        template = build_prompt("", hf_config.text_config.model_type)
        tokenizer = word_tokenizer(
            hf_config, [template] + [question.prompt for question in workload.questions]
        )
        anyres = hf_config.model_type == "llava_next"
        image_processor = (presets.anyres_image_processor if anyres else presets.llava15_image_processor)(
            hf_config
        )
    else:
        saved = Preprocessor.from_checkpoint(spec["model"], hf_config)
        tokenizer, image_processor = saved.tokenizer, saved.image_processor
    count = timed_batch_count(spec["batch"], spec["timed_batches"], spec["min_timed_questions"])
    pool = len(workload.questions)
    timed = [batch_indices(pool, spec["batch"], number) for number in range(1, count + 1)]
    return JobWork(
        hf_config, workload, tokenizer, image_processor, batch_indices(pool, spec["batch"], 0), timed
    )


def _random_weights(spec) -> bool:
    """Whether the job's model gets random weights: a preset always, a checkpoint with --random_weights."""
    from models.presets import PRESET_NAMES

    return spec["model"] in PRESET_NAMES or bool(spec.get("random_weights"))


def jax_throughput_worker(spec: dict) -> dict:
    """Compile the configuration's programs (mode compile), or answer and time its batches (measure)."""
    jax = configure_jax(spec)
    import warnings

    import jax.numpy as jnp
    from flax import nnx

    import adaptprune_jax as prune
    from models import anyres, sharding
    from models.checkpoint import load_checkpoint
    from models.config import from_hf_config, with_attention
    from models.engine import LlavaEngine
    from models.generate import LlavaRunner, SamplingConfig
    from models.llava import LlavaForConditionalGeneration
    from models.preprocess import Preprocessor
    from models.presets import random_model, random_state

    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    hf_config, workload, tokenizer, image_processor, warmup, timed = job_work(spec)
    preprocessor = Preprocessor(hf_config, tokenizer, image_processor)
    prune.methods.import_plugins(spec.get("method_modules", ()))
    pruning = None
    if spec["method"] != "none":
        pruning = prune.make_config(
            spec["method"],
            strict=False,
            keep=spec["keep"],
            layer=spec["layer"],
            **method_settings(spec, spec["method"]),
        )
        if pruning.needs_text_tower:
            raise ValueError(
                f"{spec['method']} reads CLIP's joint space; the throughput mode builds no CLIP text tower"
            )
    batch, new_tokens, dtype = spec["batch"], spec["answer_tokens"], spec["dtype"]
    # The pre-compiled programs and the measured ones must be the same programs (one cache entry):
    # both resolve the attention implementation the same way.
    cfg = with_attention(from_hf_config(hf_config), spec["attention"], jnp.dtype(dtype))
    runner = LlavaRunner(
        nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    )
    # LLaVA-NeXT: each question's prompt holds its own image's token count (the image keeps its aspect).
    image_sizes = preprocessor.image_sizes([workload.image_of(i) for i in range(len(workload.questions))])
    sizes = image_sizes if cfg.anyres else [None] * len(image_sizes)
    prompts = [preprocessor.encode(q.prompt, size) for q, size in zip(workload.questions, sizes)]
    image_tokens = [preprocessor.image_token_count(size) for size in sizes]

    def padded(indices):  # the engine's padded prompts and image packing of these questions, no pixels
        return runner.pad_batch(
            [prompts[i] for i in indices],
            [image_sizes[i] for i in indices] if cfg.anyres else None,
            pad_token_id=preprocessor.pad_token_id,
            max_new_tokens=new_tokens,
        )

    def program(indices):  # what picks the prefill program: the width and (NeXT) the image slots
        input_ids, _, packed = padded(indices)
        return input_ids.shape[1], None if packed is None else (packed.layout.num_tokens, packed.layout.dense)

    warm = warmup_batches(warmup, timed, program)
    programs = [program(indices) for indices in warm]
    asked = [i for indices in timed for i in indices]
    out = {
        "status": "ok",
        "keep": runner.resolve_keep(pruning),
        "layer": None if pruning is None else pruning.layer,
        "anyres": cfg.anyres,
        "image_tokens": _min_mean_max([image_tokens[i] for i in asked]),  # per timed question
        "attention": cfg.text.attention,  # as resolved: the vision tower's and the LLM prefill's
        "prompt_tokens": _min_mean_max([len(prompt) for prompt in prompts]),
        "padded_lengths": sorted({width for width, _ in programs}),
    }
    if cfg.anyres:  # the image span each batch is padded to (its most image tokens, bucketed)
        out["image_slots"] = sorted({slots for _, (slots, _) in programs})
    if spec["mode"] == "compile":  # the engine's two programs from abstract shapes, into the cache
        sds, key = jax.ShapeDtypeStruct, jax.eval_shape(lambda: jax.random.key(0))

        def abstract(tree):
            return jax.tree.map(lambda x: sds(np.shape(x), np.asarray(x).dtype), tree)

        sampling = SamplingConfig(
            max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=preprocessor.pad_token_id
        )
        start = time.perf_counter()
        if _random_weights(spec):
            random_state(runner.state, spec["seed"], compile_only=True)
        size = cfg.vision.image_size
        crops = (anyres.max_crops(cfg),) if cfg.anyres else ()
        for indices in warm:  # one batch of each program the measuring process runs
            input_ids, lengths, packed = padded(indices)
            images = (None, None) if packed is None else (abstract(packed.index), abstract(packed.layout))
            if packed is not None:
                runner.resolve_keep(pruning, packed.layout)
            lowered = runner.prefill_program.lower(
                runner.weights,
                abstract(input_ids),
                abstract(lengths),
                sds((batch, *crops, 3, size, size), jnp.float32),
                key,
                None,
                None,
                *images,
                extra_slots=new_tokens,
                pruning=pruning,
                all_logits=False,
            )
            lowered.compile()
            result = lowered.out_info
            runner.decode_loop.lower(
                runner.weights, result.logits, result.caches, result.next_positions, key, sampling=sampling
            ).compile()
        out["compile_s"] = round(time.perf_counter() - start, 3)
        return out

    start = time.perf_counter()
    mesh = sharding.make_mesh(spec["mesh"]) if spec.get("mesh") else None
    if _random_weights(spec):
        model = random_model(hf_config, dtype=dtype, seed=spec["seed"], attention=spec["attention"])
    else:
        model = load_checkpoint(spec["model"], dtype, attention=spec["attention"])[1]
    runner = LlavaRunner(model, mesh=mesh)
    del model  # (on a model axis the runner holds its own, re-laid-out copy)
    jax.block_until_ready(runner.weights)
    out["weights_s"] = round(time.perf_counter() - start, 3)
    out["mesh"] = "" if mesh is None else sharding.describe_mesh(mesh)
    out["devices"] = 1 if mesh is None else mesh.size
    engine = LlavaEngine(runner, preprocessor, hf_config)
    clock, outputs = StageClock(), []
    for name in ("encode", "pixel_values"):
        setattr(preprocessor, name, clock.wrap("preprocess", getattr(preprocessor, name)))
    runner.make_batch = clock.wrap("preprocess", runner.make_batch)
    runner.generate = clock.wrap("generate", runner.generate, outputs.append)
    preprocessor.decode = clock.wrap("detokenize", preprocessor.decode)

    def request(indices):
        images, questions = workload.batch(indices)
        return dict(
            images=images, questions=questions, pruning=pruning, max_new_tokens=new_tokens, stop_at_eos=False
        )

    def answer(indices):
        return engine.answer(**request(indices)).texts

    start = time.perf_counter()
    answer(warm[0])
    out["first_batch_s"] = round(time.perf_counter() - start, 3)
    for indices in warm[1:]:
        answer(indices)
    out["warmup_batches"] = len(warm)
    outputs.clear()
    traced = sum(runner.trace_counts.values())
    out["overlap_preprocessing"] = bool(spec.get("overlap_preprocessing"))
    if out["overlap_preprocessing"]:
        streamed = engine.answer_stream((None, request(indices)) for indices in timed)
        out.update(_timed_stream(streamed, clock, batch))
    else:
        out.update(_timed_run(answer, timed, clock, batch))
    out["traces_while_timed"] = sum(runner.trace_counts.values()) - traced  # 0: no timed batch compiled
    out["questions_per_s_per_device"] = out["questions_per_s"] / out["devices"]
    return dict(out, **_answer_lengths(outputs), **_device_jax())


def warmup_batches(warmup: list[int], timed: list[list[int]], program) -> list[list[int]]:
    """The warm-up batch, then the first timed batch of each other prefill program
    (``program(indices)``: its padded prompt length, and on LLaVA-NeXT its image slots): the engine
    compiles once per program, and no timed batch may."""
    warm, seen = [warmup], {program(warmup)}
    for indices in timed:
        if program(indices) not in seen:
            seen.add(program(indices))
            warm.append(indices)
    return warm


def llava_processor(hf_config, tokenizer, image_processor):
    """transformers' processor of the model's kind (LlavaProcessor, LlavaNextProcessor) over the job's
    ``image_processor`` and ``tokenizer``, counting image tokens as llava-hf's does and padding on the
    left as batched generation needs (the new tokens follow every prompt's end)."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # a checkpoint's tokenizer without one pads with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    processor_class = LlavaNextProcessor if hf_config.model_type == "llava_next" else LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's [CLS], as llava-hf's processor counts it
    )


def _timed_run(answer, timed, clock, batch) -> dict:
    """Answer and time each batch of ``timed``; the throughput, stages, answers and their count."""
    batch_seconds, stage_seconds, answers = [], [], []
    for indices in timed:
        clock.reset()
        start = time.perf_counter()
        texts = answer(indices)
        batch_seconds.append(time.perf_counter() - start)
        stage_seconds.append(dict(clock.seconds))
        answers += texts
    return dict(
        rate_summary(batch, batch_seconds, stage_seconds),
        answers_returned=len(answers),
        example_answers=answers[:EXAMPLE_ANSWERS],
    )


def _timed_stream(streamed, clock, batch) -> dict:
    """Answer and time each batch of an answer stream (the next batch prepared while one generates):
    a batch's seconds run from the previous batch's answers to its own; the stages are summed over the
    whole run (preprocessing overlaps generation, so they may add up to more than the wall time)."""
    batch_seconds, answers = [], []
    clock.reset()
    start = time.perf_counter()
    for _, result in streamed:
        now = time.perf_counter()
        batch_seconds.append(now - start)
        start = now
        answers += result.texts
    return dict(
        rate_summary(batch, batch_seconds, [dict(clock.seconds)]),
        answers_returned=len(answers),
        example_answers=answers[:EXAMPLE_ANSWERS],
    )


def _answer_lengths(outputs) -> dict:
    """How many tokens each timed answer got (JAX: from the engine's generation outputs)."""
    counts = collections.Counter(int(n) for output in outputs for n in output.num_generated)
    return {"answer_token_counts": {str(n): c for n, c in sorted(counts.items())}}


def _min_mean_max(values) -> dict:
    return {"min": min(values), "mean": round(statistics.mean(values), 2), "max": max(values)}


def _device_jax() -> dict:
    import jax

    device = jax.devices()[0]
    stats = memory_stats()
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


def torch_throughput_worker(spec: dict) -> dict:
    """transformers' LLaVA or LLaVA-NeXT (sdpa; random weights built on the device, or the checkpoint's)
    answering the same batches."""
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from models.preprocess import build_prompt

    transformers.logging.set_verbosity_error()
    hf_config, workload, tokenizer, image_processor, warmup, timed = job_work(spec)
    processor = llava_processor(hf_config, tokenizer, image_processor)
    template = hf_config.text_config.model_type
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)  # CPU runs are tests on shared cores: spinning thread pools stall there
    dtype = getattr(torch, spec["dtype"])
    model_class = (
        LlavaNextForConditionalGeneration
        if hf_config.model_type == "llava_next"
        else LlavaForConditionalGeneration
    )
    start = time.perf_counter()
    torch.manual_seed(spec["seed"])
    if _random_weights(spec):
        with torch.device(device):
            model = model_class._from_config(hf_config, dtype=dtype, attn_implementation="sdpa").eval()
    else:
        model = model_class.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
    out = {"status": "ok", "keep": 0, "weights_s": round(time.perf_counter() - start, 3)}
    new_tokens, clock = spec["answer_tokens"], StageClock()
    answer_lengths, padded_lengths, image_tokens = collections.Counter(), [], []  # of the timed batches

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def answer(indices):
        images, questions = workload.batch(indices)
        start = time.perf_counter()
        inputs = processor(
            images=images,
            text=[build_prompt(q, template) for q in questions],
            padding=True,
            return_tensors="pt",
        ).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        sync()
        middle = time.perf_counter()
        generated = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        sync()
        end = time.perf_counter()
        new = generated[:, inputs["input_ids"].shape[1] :]
        texts = [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
        clock.seconds["preprocess"] += middle - start
        clock.seconds["generate"] += end - middle
        clock.seconds["detokenize"] += time.perf_counter() - end
        answer_lengths.update([new.shape[1]] * new.shape[0])
        padded_lengths.append(int(inputs["input_ids"].shape[1]))
        image_tokens.extend((inputs["input_ids"] == hf_config.image_token_index).sum(1).tolist())
        return texts

    with torch.inference_mode():
        start = time.perf_counter()
        answer(warmup)
        out["first_batch_s"] = round(time.perf_counter() - start, 3)
        out["warmup_batches"] = 1
        answer_lengths.clear()
        padded_lengths.clear()
        image_tokens.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out.update(_timed_run(answer, timed, clock, spec["batch"]))
    out["padded_lengths"] = sorted(set(padded_lengths))
    out["image_tokens"] = _min_mean_max(image_tokens)  # per timed question, as the processor expanded it
    out["answer_token_counts"] = {str(n): c for n, c in sorted(answer_lengths.items())}
    out["device_kind"] = torch.cuda.get_device_name() if cuda else "cpu"
    out["platform"] = "gpu" if cuda else "cpu"
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return out
