"""What decides a pair's answers, recorded beside its predictions so a rerun never mixes in foreign ones.

A pair's fingerprint has three parts:
  * the checkpoint's content: the sha256 of every file the loader reads (config, weights, tokenizer,
    processor), so a retrained checkpoint written to the same folder is noticed and a harmless
    spelling of its path (`checkpoints/testbed/`) is not; for a method reading CLIP's joint space,
    the text tower's files too;
  * the settings that change an answer, defaults resolved: the method's whole config (its layer and
    seed as the method sees them, so an explicit `--layer` equal to the default is the same pair), the
    benchmark, the question file and image folder as real paths, max_new_tokens, dtype and the
    attention implementation as resolved (cuDNN's and einsum's bfloat16 round-offs differ; `auto`
    itself decides nothing until it is resolved);
  * the source of the code that computes the answer: every module of `adaptprune_jax` and `models`,
    the evaluation loop, the benchmark's prompt formatting, and the pair's own method file (another
    method's file does not touch this pair).

`--batch_size` and `--limit` are not in it: answers do not depend on the batching (seeded methods
draw per question) and a larger limit only adds questions.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.evaluation.config import RUN_FINGERPRINT_JSON, EvalConfig
from experiments.evaluation.generation import predictions_path
from experiments.evaluation.pairs import Pair

logger = logging.getLogger(__name__)

# The files of a llava-hf checkpoint that the loader, tokenizer or processor reads.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "*processor_config.json",
    "chat_template*",
)
# Packages whose every module can change an answer (a method's own file only for its own pairs).
ANSWER_PACKAGES = ("adaptprune_jax", "models")
ANSWER_MODULES = ("experiments.evaluation.generation", "experiments.benchmarks.base")


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(directory: str) -> dict[str, str]:
    """file name -> sha256 of every checkpoint file that decides an answer."""
    names = sorted(
        name
        for name in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, name))
        and any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)
    )
    return {name: file_digest(os.path.join(directory, name)) for name in names}


def _module_file(module: str) -> str:
    loaded = sys.modules.get(module) or importlib.import_module(module)
    return loaded.__file__


def package_modules(package: str) -> dict[str, str]:
    """module name -> source file of every module of `package`."""
    root = os.path.dirname(_module_file(package))
    modules = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), os.path.dirname(root))
                dotted = relative[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = os.path.join(folder, name)
    return modules


def code_digests(method_modules: set[str], benchmark_module: str) -> dict[str, str]:
    """module name -> sha256 of the shared answer code; the registered methods' own files left out."""
    files = {}
    for package in ANSWER_PACKAGES:
        files.update(package_modules(package))
    for module in (*ANSWER_MODULES, benchmark_module):
        files[module] = _module_file(module)
    return {
        module: file_digest(path) for module, path in sorted(files.items()) if module not in method_modules
    }


def _real_paths(paths: str) -> str:
    return ",".join(os.path.realpath(part) for part in paths.split(","))


def shared_fingerprint(config: EvalConfig, benchmark, max_new_tokens: int, attention: str) -> dict[str, Any]:
    """The parts every pair of the run has in common; ``attention``: the implementation the model runs."""
    from adaptprune_jax import methods

    method_modules = {config_class.__module__ for config_class in methods.METHODS.values()}
    return {
        "checkpoint": checkpoint_digest(config.checkpoint),
        "text_tower": None if config.text_tower is None else checkpoint_digest(config.text_tower),
        "settings": {
            "benchmark": benchmark.name,
            "questions": _real_paths(config.questions),
            "image_dir": None if config.image_dir is None else os.path.realpath(config.image_dir),
            "max_new_tokens": max_new_tokens,
            "dtype": config.dtype,
            "attention": attention,
        },
        "code": code_digests(method_modules, type(benchmark).__module__),
    }


def pair_fingerprint(shared: Mapping[str, Any], pair: Pair) -> dict[str, Any]:
    """`shared` plus the pair's method config and its method file (and, for a method that reads
    CLIP's joint space, the text tower's files)."""
    shared = dict(shared)
    text_tower = shared.pop("text_tower", None)
    code = dict(shared["code"])
    checkpoint = dict(shared["checkpoint"])
    method: dict[str, Any] = {"method": pair.method}
    if pair.pruning is not None:
        method.update(dataclasses.asdict(pair.pruning))
        module = type(pair.pruning).__module__
        code[module] = file_digest(_module_file(module))
        if pair.pruning.needs_text_tower:
            checkpoint.update({f"text_tower/{name}": digest for name, digest in (text_tower or {}).items()})
    return {
        **shared,
        "checkpoint": checkpoint,
        "method": json.loads(json.dumps(method)),
        "code": dict(sorted(code.items())),
    }


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed between two fingerprints, one phrase per item."""
    changes = []
    for part, label in (("checkpoint", "checkpoint file"), ("code", "code of")):
        before, after = old.get(part, {}), new.get(part, {})
        for name in sorted(set(before) | set(after)):
            if name not in before:
                changes.append(f"{label} {name} is new")
            elif name not in after:
                changes.append(f"{label} {name} is gone")
            elif before[name] != after[name]:
                changes.append(f"{label} {name} changed")
    for part, label in (("settings", "setting"), ("method", "method setting")):
        before, after = old.get(part, {}), new.get(part, {})
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changes.append(f"{label} {name}: {before.get(name)!r} -> {after.get(name)!r}")
    return changes


def claim_output_dir(
    output_dir: str, pairs: Sequence[Pair], shared: Mapping[str, Any], overwrite: bool
) -> None:
    """Check every pair's existing predictions against its fingerprint (`shared` plus its own, see
    `pair_fingerprint`), then record the fingerprints.

        A pair whose prediction file was written under another fingerprint (or under none: older code)
        is refused, naming what changed, unless `overwrite`, which deletes those files to recompute them.
    """
    path = os.path.join(output_dir, RUN_FINGERPRINT_JSON)
    recorded: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path) as file:
                recorded = json.load(file)
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); pass --overwrite to recompute") from None
    recorded_pairs = recorded.get("pairs", {})
    fingerprints = {pair.name: pair_fingerprint(shared, pair) for pair in pairs}
    refused = []
    for pair in pairs:
        name, fingerprint, predictions = (
            pair.name,
            fingerprints[pair.name],
            predictions_path(output_dir, pair),
        )
        if not os.path.exists(predictions):
            continue
        if overwrite:
            os.remove(predictions)
            logger.info("%s: --overwrite, recomputing its predictions", name)
            continue
        if name not in recorded_pairs:
            refused.append(f"{name}: no recorded fingerprint (written by an older version of the code)")
            continue
        changes = differences(recorded_pairs[name], fingerprint)
        if changes:
            refused.append(f"{name}: {'; '.join(changes)}")
    if refused:
        raise ValueError(
            f"{output_dir} holds predictions this run would not give: "
            + " | ".join(refused)
            + ". Pass --overwrite to recompute them, or use another --output_dir"
        )
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as file:
        json.dump({"pairs": {**recorded_pairs, **fingerprints}}, file, indent=1, sort_keys=True)
