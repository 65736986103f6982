"""Speed and memory of the jitted JAX LLaVA-1.5 (and LLaVA-NeXT, `--image_size`), pruned and unpruned,
against the floor and PyTorch.

    python -m experiments.benchmark --flagfile=experiments/flags/benchmark_h200_latency.flags
    python -m experiments.benchmark --flagfile=experiments/flags/benchmark_h200_next.flags
    python -m experiments.benchmark --model=tiny --batch_sizes=1 --methods=none,adaptprune --keep=64
    python -m experiments.benchmark --replot=experiments/results/h200_latency/results.json
    python -m experiments.benchmark --flagfile=experiments/flags/benchmark_h200_throughput.flags

The acceptance run on an H200 is three commands (flagfiles benchmark_h200_{latency,batch,max_batch});
each prints its table and pass/fail lines last.

Why it is built this way:
- One configuration (model, method, keep, batch) per process: each gets its own allocator, so
  `peak_bytes_in_use` is that configuration's peak and an out-of-memory error kills one row, not the
  run. Workers are this package re-run with --worker=<json>; they hand back JSON.
- Compilation is the expensive part of a 7B run, so every worker shares a persistent compilation
  cache, and a pre-compile phase fills it from abstract shapes in parallel processes (no weights
  needed) before the serial, GPU-exclusive measuring phase; a measuring worker then mostly loads
  executables. Compile time is reported separately from every timing.
- Timings are medians of repeated runs after warm-up, each closed by block_until_ready. Stages:
  vision tower (+ projector); LLM prefill from embeddings; selection overhead = prefill with the
  method minus prefill pruned at the same layer to FIXED indices (no cue, no selection work); time to
  first token (vision + embed + prefill with selection + argmax, dispatched asynchronously); decode
  per token (the project's while_loop generation, no early EOS stop, divided by its steps);
  end-to-end for --new_tokens tokens. The KV cache is sized to prompt + new tokens.
- Floors come from the config's shapes and two ceilings measured in the same run (a large device
  copy, a large bf16 matmul): time >= max(FLOPs / matmul rate, bytes / copy bandwidth). An in-run
  ceiling can come out below what the device does, which would flatter every ratio:
  --reference_bandwidth_tbps and --reference_matmul_tflops give rates known to be reachable there,
  and each floor then uses the faster of the two. --replot with them re-judges a finished run.
- Random weights are drawn on the device (eval_shape, then a small compiled generator per leaf
  shape), so a 7B model exists in seconds; inputs are random token ids with one image span, and
  random pixels (never zeros).
- --torch_baseline runs transformers' LlavaForConditionalGeneration (sdpa, random weights built on
  the device) on the same shapes, in separate processes. Its "pruned" rows cut image tokens BEFORE
  the language model (inputs_embeds with keep image tokens, no selection work), as PyTorch toolkits time it.
- A --deadline_s budget skips (and records) what no longer fits, so a capped run still writes
  results.json, results.md and the plot.

--mode=throughput measures questions per second of the evaluation's answer path instead, JAX
against transformers' generate, on POPE-shaped work (`throughput` says how and why).

Modules: `configs` (settings, the planned configurations), `jobs` (worker subprocesses, the
pre-compile phase), `workers`, `workers_jax`, `workers_torch` (what runs inside a worker), `floors`,
`max_batch`, `acceptance`, `report`, `driver` (the run from start to end); `profiling` and `timing`
serve them. The throughput mode: `throughput` (its run), `workload` (its questions, images,
tokenizer and batches), `workers_throughput`, `report_throughput`. `prefill_speed` and
`dispatch_overhead` are smaller one-process speed experiments.
"""
