"""The PyTorch worker: transformers' LLaVA (LLaVA-NeXT) on the shapes of a JAX configuration, as a baseline."""

from __future__ import annotations

import time

from experiments.benchmark.timing import median, timed
from experiments.benchmark.workers import benchmark_image, llava_hf_config, random_pixels, random_prompts


def torch_worker(spec: dict) -> dict:
    """transformers' PyTorch LLaVA (sdpa), random weights built on the device, same shapes as JAX;
    LLaVA-NeXT: LlavaNextForConditionalGeneration with the crops (B, C, 3, H, W) and image_sizes."""
    import numpy as np
    import torch
    import transformers
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from models.config import from_hf_config

    transformers.logging.set_verbosity_error()
    hf_config = llava_hf_config(spec["model"])
    cfg = from_hf_config(hf_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # CPU runs are tests on shared cores: spinning thread pools stall there
    torch.manual_seed(spec["seed"])
    model_class = LlavaNextForConditionalGeneration if cfg.anyres else LlavaForConditionalGeneration
    with torch.device(device):
        model = model_class._from_config(
            hf_config, dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa"
        ).eval()
    image = benchmark_image(cfg, spec.get("image_size", ""))
    batch, n_img, keep, new_tokens = spec["batch"], image.num_tokens, spec["keep"], spec["new_tokens"]
    if not 0 <= keep <= n_img:
        raise ValueError(f"keep={keep} is outside 0..{n_img} image tokens")
    ids, start = random_prompts(
        batch, spec["text_tokens"], n_img, cfg.text.vocab_size, cfg.image_token_index, spec["seed"]
    )
    ids = torch.from_numpy(ids).long().to(device)
    pixels = torch.from_numpy(random_pixels(batch, cfg.vision.image_size, spec["seed"], image.crops)).to(
        device, model.dtype
    )
    images = {"pixel_values": pixels}
    if cfg.anyres:
        images["image_sizes"] = torch.tensor([image.size] * batch, device=device)
    mask = torch.ones_like(ids)
    kept = torch.tensor(np.arange(keep) * n_img // keep if keep else np.arange(n_img), device=device)

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    def embeddings():
        """Text embeddings with the image span replaced by the (kept) image features."""
        features = torch.stack(model.get_image_features(**images).pooler_output)
        text = model.get_input_embeddings()(ids)
        return torch.cat([text[:, :start], features[:, kept].to(text.dtype), text[:, start + n_img :]], dim=1)

    def first_token():
        if keep:
            x = embeddings()
            logits = model(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], logits_to_keep=1).logits
        else:
            logits = model(input_ids=ids, **images, attention_mask=mask, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1)

    generate_kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=int(hf_config.text_config.pad_token_id or 0),
    )

    def generation():
        if keep:
            x = embeddings()
            return model.generate(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], **generate_kwargs)
        return model.generate(input_ids=ids, **images, attention_mask=mask, **generate_kwargs)

    reps, e2e_reps = spec["repeats"], spec["e2e_repeats"]
    out = {
        "status": "ok",
        "device": device,
        "keep": keep,
        "prompt_tokens": ids.shape[1],
        "image_tokens": n_img,
        "image_size": "x".join(map(str, image.size)),
        "crops": image.crops,
    }
    with torch.inference_mode():
        start_time = time.perf_counter()
        sync(first_token())
        out["first_call_s"] = round(time.perf_counter() - start_time, 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        samples = {"vision_ms": timed(lambda: model.get_image_features(**images).pooler_output, reps, sync)}
        x = embeddings()
        samples["llm_prefill_ms"] = timed(
            lambda: model(inputs_embeds=x, attention_mask=mask[:, : x.shape[1]], logits_to_keep=1).logits,
            reps,
            sync,
        )
        samples["ttft_ms"] = timed(first_token, reps, sync)
        samples["e2e_ms"] = timed(generation, e2e_reps, sync)
        generated = generation()
    out["generated_tokens"] = int(generated.shape[1] - (0 if keep else ids.shape[1]))
    out["samples"] = {k: [round(v, 4) for v in s] for k, s in samples.items()}
    out.update({k: median(s) for k, s in samples.items()})
    if out["e2e_ms"] is not None and out["ttft_ms"] is not None:
        out["decode_ms_per_token"] = (out["e2e_ms"] - out["ttft_ms"]) / (new_tokens - 1)  # derived
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return out
