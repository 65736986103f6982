"""Cross-framework validation: the Flax model against transformers' PyTorch LLaVA on the same weights.

    python -m experiments.validate --config=tiny --random_weights
    python -m experiments.validate --checkpoint=/path/to/llava-1.5-7b-hf --dtype=bfloat16
    python -m experiments.validate --checkpoint=/path/to/llava-v1.6-vicuna-7b-hf --dtype=bfloat16
    python -m experiments.validate --checkpoint=DIR --method=adaptprune --keep=64 --layer=2
    python -m experiments.validate --config=tiny-gqa --random_weights --method=sparsevlm --keep=64 \
        --method_settings=sparsevlm.layers=0/1/2
    python -m experiments.validate --checkpoint=checkpoints/testbed-deep --method=cdpruner --keep=64 \
        --text_tower=checkpoints/testbed-deep/clip

Both sides get the same token ids and pixels. Reported: max_abs_err, max_rel_err (max |jax - torch| /
max |torch| over every prompt logit), mean_kl (KL(torch || jax) per position, averaged), top1_agreement,
generated_equal (greedy continuations identical), and with pruning kept_indices_equal (the JAX
library's selection == the PyTorch reference selection; for a method that merges inside the LLM, the
original indices kept after the last stage, -1 for each merged token, and merged_tokens, their count).
The reference is always PyTorch float32; in bfloat16 the JAX error is judged against PyTorch
bfloat16's own error (the bf16 noise floor). A LLaVA-NeXT checkpoint (or preset) is compared with
transformers' LlavaNextForConditionalGeneration on the image's crops and size, unpruned.
Exit status 1 when the tolerance is exceeded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app

from adaptprune_jax import methods
from experiments.flag_config import attention_setting, define_flags, from_flags, one_line_errors, setting
from experiments.jax_runtime import quiet_backend_probe

UNPRUNED = "none"


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """One validation run: which model (a checkpoint, or a preset with random weights), which input,
    which pruning, and the tolerance it is judged by."""

    checkpoint: str | None = setting(
        None, "llava-hf checkpoint directory (config.json + safetensors + tokenizer)."
    )
    config: str | None = setting(
        None,
        "Preset name (llava-1.5-7b, llava-v1.6-vicuna-7b, tiny, tiny-gqa, tiny-full, tiny-next, ...) with "
        "--random_weights.",
    )
    random_weights: bool = setting(False, "Build random weights with transformers for --config.")
    transfer: str = setting(
        "memory",
        "How random weights reach JAX: in memory (state dict) or via save_pretrained to a temp dir.",
        choices=("memory", "directory"),
    )
    max_shard_size: str | None = setting(
        None, "With --transfer=directory: shard the saved checkpoint (e.g. 300KB)."
    )
    text_tower: str | None = setting(
        None,
        "CLIPModel directory (text tower, visual_projection, tokenizer) for a method reading CLIP's joint "
        "space (cdpruner); with --random_weights, default: a random one written for the preset.",
    )
    image: str | None = setting(None, "Image file; default: scikit-image's astronaut photo.")
    prompt: str = setting("Describe the image in detail.", "Question text (vicuna_v1 template).")
    min_prompt_tokens: int = setting(0, "Pad the question with filler words up to this many tokens.")
    dtype: str = setting("float32", "JAX parameter/activation dtype.", choices=("float32", "bfloat16"))
    attention: str = attention_setting(" In float32, auto is einsum: the parity path.")
    generate_tokens: int = setting(20, "Greedy tokens to compare (0 = skip generation).")
    method: str = setting(
        UNPRUNED, f"Pruning method: {UNPRUNED} or a registered one ({', '.join(methods.names())}, ...)."
    )
    method_modules: tuple[str, ...] = setting(
        (), "Modules to import first that register pruning methods of their own (e.g. tests.keynorm_method)."
    )
    keep: str = setting("0.1", "Image tokens to keep: a count (64) or a ratio (0.1).")
    method_settings: tuple[str, ...] = setting(
        (),
        "Settings of the method, as method.setting=value (e.g. sparsevlm.layers=0/1/2): values are "
        "Python literals, '/' separates the items of a tuple.",
    )
    layer: int = setting(2, "Pruning layer K (unused by methods that prune before the LLM).")
    seed: int = setting(0, "Seed for random weights and for a method that takes one.")
    tolerance: float | None = setting(
        None, "max_rel_err tolerance in float32 (default 1e-5 on CPU, 1e-4 on GPU)."
    )
    noise_floor_factor: float = setting(1.5, "bfloat16: JAX error may be at most this times PyTorch bf16's.")
    output: str | None = setting(None, "Write the JSON report here.")


FILLER = "please tell me more about this scene"


def parse_keep(text: str) -> int | float:
    """'64' -> 64, '0.1' -> 0.1 (a count or a ratio of the image tokens)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"keep must be a count (e.g. 64) or a ratio (e.g. 0.1), got {text!r}") from None


def default_image():
    import PIL.Image
    from skimage import data

    return PIL.Image.fromarray(data.astronaut())


def logit_metrics(jax_logits: np.ndarray, torch_logits: np.ndarray) -> dict:
    """Errors of `jax_logits` against the reference `torch_logits` (both (S, V), float64 here)."""
    a, b = jax_logits.astype(np.float64), torch_logits.astype(np.float64)
    diff = np.abs(a - b)
    log_p = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    log_q = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {
        "max_abs_err": float(diff.max()),
        "max_rel_err": float(diff.max() / np.abs(b).max()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "positions": int(a.shape[0]),
    }


def build_question(preprocessor, question: str, min_prompt_tokens: int, image_size=None) -> list[int]:
    """Prompt ids for `question`, padded with filler words until at least `min_prompt_tokens` long
    (``image_size`` (height, width): the image's, which sets a LLaVA-NeXT prompt's image tokens)."""
    ids = preprocessor.encode(question, image_size)
    while len(ids) < min_prompt_tokens:
        question = f"{question} {FILLER}"
        ids = preprocessor.encode(question, image_size)
    return ids


def torch_model_class(hf_config):
    """transformers' class of a config: LLaVA-NeXT's for an anyres (llava_next) one, else LLaVA's."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    if hf_config.model_type == "llava_next":
        return LlavaNextForConditionalGeneration
    return LlavaForConditionalGeneration


def _hf_config(settings: ValidateConfig):
    """The transformers config of the checkpoint or the preset."""
    from models import checkpoint, presets

    if settings.checkpoint:
        return checkpoint.load_hf_config(settings.checkpoint)
    if not (settings.config and settings.random_weights):
        raise app.UsageError("give --checkpoint=DIR, or --config=NAME --random_weights")
    return presets.llava_config(settings.config)


def _load_sides(settings: ValidateConfig, torch_device: str):
    """(hf_config, torch float32 model, preprocessor, JAX weights source, description)."""
    import torch

    from models import checkpoint, presets
    from models.preprocess import Preprocessor

    hf_config = _hf_config(settings)
    if settings.checkpoint:
        torch_model = torch_model_class(hf_config).from_pretrained(settings.checkpoint, dtype=torch.float32)
        preprocessor = Preprocessor.from_checkpoint(settings.checkpoint, hf_config)
        return (
            hf_config,
            torch_model.to(torch_device).eval(),
            preprocessor,
            checkpoint.TensorSource(settings.checkpoint),
            f"checkpoint {settings.checkpoint}",
        )
    torch.manual_seed(settings.seed)
    with torch.device(torch_device):
        torch_model = torch_model_class(hf_config)(hf_config).float().eval()
    image_processor = (
        presets.anyres_image_processor(hf_config)
        if hf_config.model_type == "llava_next"
        else presets.llava15_image_processor(hf_config)
    )
    preprocessor = Preprocessor(hf_config, presets.tiny_tokenizer(hf_config), image_processor)
    if settings.transfer == "directory":
        directory = tempfile.mkdtemp(prefix="validate_")
        presets.write_random_checkpoint(
            hf_config, directory, model=torch_model, max_shard_size=settings.max_shard_size
        )
        source = checkpoint.TensorSource(directory)
    else:
        source = checkpoint.StateDictSource(checkpoint.state_dict_to_numpy(torch_model.state_dict()))
    return (
        hf_config,
        torch_model,
        preprocessor,
        source,
        f"preset {settings.config}, random weights (seed {settings.seed})",
    )


def run(settings: ValidateConfig) -> dict:
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    from models import checkpoint, torch_reference
    from models.config import from_hf_config
    from models.generate import LlavaRunner, SamplingConfig, tokens_until_eos
    from models.preprocess import load_image

    methods.import_plugins(settings.method_modules)
    if settings.method != UNPRUNED:
        methods.get(settings.method)  # an unknown name fails here, listing the registered ones
        if _hf_config(settings).model_type == "llava_next":  # before any weights load
            raise ValueError(
                f"--method={settings.method} on a LLaVA-NeXT model: the PyTorch references of the pruning "
                "methods take LLaVA-1.5's one image layout, not LLaVA-NeXT's packed crops; validate the "
                "unpruned model here (--method=none), pruned LLaVA-NeXT runs are checked by the tests"
            )
    on_gpu = torch.cuda.is_available()
    torch_device = "cuda" if on_gpu else "cpu"
    started = time.time()
    hf_config, torch_model, preprocessor, source, description = _load_sides(settings, torch_device)
    cfg = from_hf_config(hf_config)
    image = load_image(settings.image) if settings.image else default_image()
    # LLaVA-NeXT: the image's size sets its crops and image tokens, on both sides.
    image_size = preprocessor.image_sizes([image])[0] if cfg.anyres else None
    ids = build_question(preprocessor, settings.prompt, settings.min_prompt_tokens, image_size)
    pixels = preprocessor.pixel_values([image])
    input_ids_t = torch.tensor([ids], device=torch_device)
    pixels_t = torch.tensor(pixels, device=torch_device)
    images_t = {"pixel_values": pixels_t}
    if cfg.anyres:
        images_t["image_sizes"] = torch.tensor([image_size], device=torch_device)

    # Each method takes only the settings it has (a layer, a seed), and its own given ones.
    pruning = None
    if settings.method != UNPRUNED:
        from experiments.evaluation.pairs import parse_method_settings

        own = parse_method_settings(settings.method_settings, [settings.method]).get(settings.method, {})
        common = {"keep": parse_keep(settings.keep), "layer": settings.layer, "seed": settings.seed}
        pruning = methods.make_config(settings.method, strict=False, **{**common, **own})
    elif settings.method_settings:
        raise ValueError("--method_settings needs a --method")
    if pruning is not None:  # before either side runs: a specific error for a setting that cannot fit
        pruning.validate(cfg.num_image_tokens, cfg.text.num_layers, cfg.image_layout())
    text_tower, query_ids = _text_tower(settings, pruning, hf_config), None
    if text_tower is not None:  # the question as the released evaluation gives the text tower
        from transformers import AutoTokenizer

        from experiments.benchmarks.base import text_tower_query

        query_ids = AutoTokenizer.from_pretrained(text_tower)(text_tower_query(settings.prompt))["input_ids"]
    report = {
        "model": description,
        "dtype": settings.dtype,
        "method": settings.method,
        "prompt_tokens": len(ids),
        "image_tokens": ids.count(cfg.image_token_index),
        "device": str(jax.devices()[0]),
        "torch_device": torch_device,
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }

    # PyTorch float32 reference (and, for bf16, PyTorch bf16's own error = the noise floor).
    torch_kept = None
    layer = None if pruning is None else pruning.layer
    if pruning is None:
        with torch.no_grad():
            reference = torch_model(input_ids=input_ids_t, **images_t).logits[0].float().cpu().numpy()
    else:
        keep = pruning.resolve_keep(cfg.num_image_tokens)
        report["keep"] = keep
        report["equivalent_tokens"] = pruning.equivalent_tokens(cfg.num_image_tokens, cfg.text.num_layers)
        staged = len(pruning.stages(cfg.num_image_tokens, cfg.text.num_layers)) > 1
        if pruning.merges:
            merged, torch_kept = torch_reference.merged_embeds(torch_model, input_ids_t, pixels_t, pruning)
            torch_kept = torch_kept.numpy()
        elif pruning.merges_in_llm:  # the reference's own kept and merged tokens at every stage
            torch_stages = torch_reference.merging_selection(torch_model, input_ids_t, pixels_t, pruning)
            torch_kept = torch_stages[-1].present.numpy()
        elif staged:  # the reference's own kept set at every stage; logits and tokens on those sets
            torch_stages = torch_reference.staged_selection(torch_model, input_ids_t, pixels_t, pruning)
            torch_kept = torch_stages[-1][1].numpy()
        elif query_ids is not None:
            cues = torch_reference.joint_reference_cues(
                torch_model, text_tower, input_ids_t, pixels_t, query_ids, pruning.vision_layer()
            )
            torch_kept = torch_reference.reference_select(pruning.name, keep=keep, **cues)
        elif pruning.has_torch_reference:
            torch_kept = _reference_selection(
                torch_reference, torch_model, input_ids_t, pixels_t, pruning, keep
            )

    sampling = SamplingConfig(
        max_new_tokens=max(settings.generate_tokens, 1),
        eos_token_id=preprocessor.eos_token_id,
        pad_token_id=preprocessor.pad_token_id,
    )
    if settings.dtype == "bfloat16" and pruning is None:
        with torch.no_grad():  # a copy: casting in place and back would leave bf16-rounded weights
            torch_bf16 = copy.deepcopy(torch_model).to(torch.bfloat16)
            bf16_logits = torch_bf16(input_ids=input_ids_t, **images_t).logits[0].float().cpu().numpy()
        del torch_bf16
        report["torch_bf16_vs_torch_fp32"] = logit_metrics(bf16_logits, reference)

    torch_generated = None
    if settings.generate_tokens and pruning is None:
        with torch.no_grad():
            # The prompt has no padding: without the mask transformers masks every token equal to the
            # pad id (a tokenizer whose pad token is <unk> pads with a word the prompt may contain).
            out = torch_model.generate(
                input_ids=input_ids_t,
                attention_mask=torch.ones_like(input_ids_t),
                **images_t,
                do_sample=False,
                max_new_tokens=settings.generate_tokens,
                eos_token_id=preprocessor.eos_token_id,
                pad_token_id=preprocessor.pad_token_id,
            )
        torch_generated = [int(t) for t in out[0, len(ids) :].tolist()]
    if torch_device == "cuda":  # hand the GPU to JAX
        torch_model_cpu = torch_model.cpu()
        torch.cuda.empty_cache()
    else:
        torch_model_cpu = torch_model

    # JAX side.
    model = checkpoint.load_params(cfg, source, settings.dtype, settings.attention)
    report["attention"] = model.config.text.attention  # as resolved
    del source
    if text_tower is not None:
        checkpoint.attach_text_tower(model, text_tower, settings.dtype)
    runner = LlavaRunner(model)
    batch = runner.make_batch(
        [ids],
        pixels,
        pad_token_id=preprocessor.pad_token_id,
        max_new_tokens=sampling.max_new_tokens,
        queries=None if query_ids is None else [query_ids],
        image_sizes=None if image_size is None else [image_size],
    )
    rng = jax.random.key(settings.seed)
    result = runner.prefill(batch, pruning=pruning, all_logits=True, rng=rng)
    kept = None if result.kept is None else np.array(result.kept)[0]  # writable: torch wraps it
    valid = np.asarray(result.positions)[0] >= 0
    jax_logits = np.asarray(result.logits, np.float32)[0][valid]

    if pruning is not None:
        report["kept_indices_equal"] = None if torch_kept is None else bool(np.array_equal(kept, torch_kept))
        report["kept_jax"] = kept.tolist()
        if pruning.merges_in_llm:
            report["merged_tokens"] = int(np.sum(kept < 0))
        if torch_kept is not None and not report["kept_indices_equal"]:
            report["kept_torch"] = torch_kept.tolist()
            originals = kept[kept >= 0]  # merged tokens (-1) have no original index
            shared = set(originals.tolist()) & set(torch_kept.tolist())
            report["kept_shared"] = f"{len(shared)} of {originals.size}"
        # Logits are compared on the JAX selection, so a selection difference does not hide logit errors.
        # A merging method's tokens are the reference's own (its indices are compared above); so are
        # those of a method that merges inside the LLM (its kept tokens, then every merged token's
        # members, would have to agree for the logits to).
        if pruning.merges:  # the shorter prompt of the reference's own merged embeddings
            sequence = dict(torch_reference.merged_sequence(keep), inputs_embeds=merged)
        else:
            sequence = dict(
                layer=layer, kept_image_indices=kept, renumber_positions=pruning.renumber_positions
            )
        torch_model_cpu = torch_model_cpu.to(torch_device)
        inputs = (torch_model_cpu, input_ids_t, pixels_t)
        renumber = {"renumber_positions": pruning.renumber_positions}
        if pruning.merges_in_llm:
            reference = torch_reference.merging_forward(*inputs, pruning, torch_stages)[0]
        elif staged:
            reference = torch_reference.staged_forward(*inputs, torch_stages, **renumber)[0]
        else:
            reference = torch_reference.pruned_forward(*inputs, **sequence)[0]
        reference = reference.cpu().numpy()
        if settings.generate_tokens:
            generation = dict(max_new_tokens=settings.generate_tokens, eos_token_id=preprocessor.eos_token_id)
            if pruning.merges_in_llm:
                torch_generated = torch_reference.merging_generate(
                    *inputs, pruning, torch_stages, **generation
                )
            elif staged:
                torch_generated = torch_reference.staged_generate(
                    *inputs, torch_stages, **generation, **renumber
                )
            else:
                torch_generated = torch_reference.reference_generate(*inputs, **generation, **sequence)
    report["jax_vs_torch_fp32"] = logit_metrics(jax_logits, reference)

    if settings.generate_tokens:
        generated = runner.generate(batch, sampling, pruning=pruning, rng=rng)
        jax_generated = [int(t) for t in generated.tokens[0, : generated.num_generated[0]]]
        report["generated_equal"] = jax_generated == torch_generated
        report["generated_ids_jax"], report["generated_ids_torch"] = jax_generated, torch_generated
        report["generated_jax"] = preprocessor.decode(
            tokens_until_eos(generated.tokens, generated.num_generated, preprocessor.eos_token_id)[0]
        )
        report["generated_torch"] = preprocessor.decode(torch_generated)
        report["generated_tokens"] = len(jax_generated)
    report["passed"], report["criterion"] = _judge(report, on_gpu, settings)
    report["seconds"] = round(time.time() - started, 1)
    return report


def _text_tower(settings: ValidateConfig, pruning, hf_config):
    """The CLIP directory of a method reading CLIP's joint space (None for others); with random
    weights and no --text_tower, a random CLIP written for the preset."""
    if pruning is None or not pruning.needs_text_tower:
        return None
    if settings.text_tower:
        if not os.path.isdir(settings.text_tower):
            raise FileNotFoundError(f"--text_tower directory not found: {settings.text_tower}")
        return settings.text_tower
    if settings.checkpoint:
        raise ValueError(
            f"{pruning.name} reads CLIP's joint space: give --text_tower=DIR, the CLIPModel directory "
            "of the CLIP the vision tower came from (e.g. openai/clip-vit-large-patch14-336)"
        )
    from models import presets

    directory = tempfile.mkdtemp(prefix="validate_clip_")
    presets.write_random_clip(hf_config, directory, seed=settings.seed)
    return directory


def _reference_selection(torch_reference, torch_model, input_ids_t, pixels_t, pruning, keep) -> np.ndarray:
    """The PyTorch reference's own kept indices, from the cues the config says it reads
    (`reference_cues`: the projected image features, or attention and keys at its layer), with the
    settings it says the reference takes (`reference_options`)."""
    options = {name: getattr(pruning, name) for name in pruning.reference_options}
    if "vision_attention" in pruning.reference_cues:
        cues = torch_reference.vision_reference_cues(torch_model, pixels_t, pruning)
        return torch_reference.reference_select(pruning.name, keep=keep, **cues, **options)
    if "layer_keys" in pruning.reference_cues:
        cues = torch_reference.layer_reference_cues(torch_model, input_ids_t, pixels_t, pruning.layer)
        return torch_reference.reference_select(pruning.name, keep=keep, **cues, **options)
    if "embeddings" in pruning.reference_cues:
        import torch

        with torch.no_grad():
            embeds = torch_reference.embed_inputs(torch_model, input_ids_t, pixels_t)[0]
        positions = torch_reference.image_token_positions(input_ids_t, torch_model.config.image_token_index)
        return torch_reference.reference_select(
            pruning.name, keep=keep, embeddings=embeds[positions], **options
        )
    _, cues = torch_reference.pruned_forward(
        torch_model,
        input_ids_t,
        pixels_t,
        layer=pruning.layer,
        return_cues=True,
        normalize_keys=getattr(pruning, "normalize_keys", False),
    )
    return torch_reference.reference_select(
        pruning.name, keep=keep, attention=cues.attention, keys=cues.keys, **options
    )


def _judge(report: dict, on_gpu: bool, settings: ValidateConfig) -> tuple[bool, str]:
    ours = report["jax_vs_torch_fp32"]
    if report["dtype"] == "float32":
        tolerance = settings.tolerance if settings.tolerance is not None else (1e-4 if on_gpu else 1e-5)
        passed = ours["max_rel_err"] <= tolerance
        criterion = f"max_rel_err <= {tolerance:g}"
    elif "torch_bf16_vs_torch_fp32" in report:
        floor, factor = report["torch_bf16_vs_torch_fp32"], settings.noise_floor_factor
        checks = {
            "max_rel_err": ours["max_rel_err"] <= factor * floor["max_rel_err"],
            "mean_kl": ours["mean_kl"] <= factor * floor["mean_kl"],
            "top1_disagreement": 1 - ours["top1_agreement"] <= factor * (1 - floor["top1_agreement"]) + 1e-12,
        }
        passed = all(checks.values())
        criterion = f"JAX bf16 error <= {factor}x PyTorch bf16 error on " + ", ".join(
            f"{k} ({'ok' if v else 'FAIL'})" for k, v in checks.items()
        )
    else:
        return True, "bfloat16 with pruning: reported, no tolerance"
    if report.get("kept_indices_equal") is False:
        passed, criterion = False, criterion + "; kept indices differ"
    return passed, criterion


def print_table(report: dict) -> None:
    rows = [("JAX vs PyTorch fp32", report["jax_vs_torch_fp32"])]
    if "torch_bf16_vs_torch_fp32" in report:
        rows.append(("PyTorch bf16 vs PyTorch fp32", report["torch_bf16_vs_torch_fp32"]))
    print(
        f"\n{report['model']} | dtype {report['dtype']} | attention {report['attention']} | "
        f"method {report['method']} | "
        f"{report['prompt_tokens']} prompt tokens ({report['image_tokens']} image)"
    )
    print(f"{'comparison':<30} {'max_abs_err':>12} {'max_rel_err':>12} {'mean_kl':>12} {'top1':>8}")
    for name, m in rows:
        print(
            f"{name:<30} {m['max_abs_err']:>12.3e} {m['max_rel_err']:>12.3e} {m['mean_kl']:>12.3e} "
            f"{m['top1_agreement']:>8.4f}"
        )
    for key in (
        "keep",
        "kept_indices_equal",
        "merged_tokens",
        "kept_shared",
        "generated_equal",
        "generated_jax",
        "generated_torch",
    ):
        if key in report:
            print(f"{key:<30} {report[key]}")
    print(f"{'result':<30} {'PASS' if report['passed'] else 'FAIL'} ({report['criterion']})")


def main(argv):
    del argv
    quiet_backend_probe()
    with one_line_errors("experiments.validate"):
        settings = from_flags(ValidateConfig)
        report = run(settings)
    if settings.output:
        os.makedirs(os.path.dirname(os.path.abspath(settings.output)), exist_ok=True)
        with open(settings.output, "w") as f:
            json.dump(report, f, indent=2)
    print_table(report)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    define_flags(ValidateConfig)
    app.run(main)
