"""The evaluated pairs: the unpruned model, then every (method, keep) of the config, checked up front."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from experiments.evaluation.config import UNPRUNED, EvalConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One evaluated setting: a method at a budget (the unpruned model is method 'none')."""

    method: str
    keep: int  # resolved count of image tokens the LLM keeps
    keep_requested: int | float | None
    pruning: Any  # adaptprune_jax config, None when unpruned
    equivalent_tokens: float

    @property
    def name(self) -> str:
        return f"{self.method}_{self.keep}"


def parse_keep(text: str | int | float) -> int | float:
    """'64' -> 64 (a count), '0.25' -> 0.25 (a ratio); range checks are the pruning config's."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--keep value {text!r} is neither a token count (int) nor a ratio (float)"
        ) from None


def known_method_names() -> list[str]:
    from adaptprune_jax import methods

    return [UNPRUNED, *methods.names()]


def check_method_names(methods: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated method names; an unknown one raises with the known names."""
    known = known_method_names()
    names = []
    for method in methods:
        name = method.strip().lower()
        if name not in known:
            raise ValueError(f"unknown method {method!r}; known methods: {', '.join(known)}")
        if name not in names:
            names.append(name)
    return names


def parse_method_settings(entries: Sequence[str], method_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """'pyramiddrop.layers=2/8/16' -> {'pyramiddrop': {'layers': (2, 8, 16)}}, each setting checked
    against the method's own (a method not evaluated in this run, or a setting it lacks, is an error)."""
    import ast

    from adaptprune_jax import methods

    def literal(text: str, entry: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--method_settings {entry!r}: {text!r} is not a Python literal") from None

    settings: dict[str, dict[str, Any]] = {}
    for entry in entries:
        target, equals, text = entry.partition("=")
        method, dot, name = target.strip().partition(".")
        if not equals or not dot or not name:
            raise ValueError(f"--method_settings {entry!r}: expected method.setting=value")
        if method not in method_names:
            raise ValueError(
                f"--method_settings {entry!r}: {method!r} is not among this run's methods "
                f"({', '.join(method_names)})"
            )
        known = methods.setting_names(method)
        if name not in known:
            raise ValueError(
                f"--method_settings {entry!r}: {method} has no setting {name!r}; its settings: {', '.join(known)}"
            )
        value = (
            tuple(literal(item, entry) for item in text.split("/")) if "/" in text else literal(text, entry)
        )
        settings.setdefault(method, {})[name] = value
    return settings


def build_pairs(config: EvalConfig, num_image_tokens: int, num_layers: int, layout=None) -> list[Pair]:
    """The unpruned pair first, then every (method, keep), validated against the model's sizes and,
    when given, its image-token layout (the check generation makes, so both give the same message).

    A keep or layer out of range raises the pruning config's own ValueError here, before any work; a
    budget a method has no setting for (``UnsupportedBudget``: SparseVLM's released schedules) skips
    that pair with a warning, so one sweep covers methods with different budget tables.
    Two requested keeps that resolve to the same count (192 and 1/3) are evaluated once. Each method
    takes only the settings it has: a method that prunes before the LLM has no layer, and only a
    random one a seed; `layer=None` leaves each method its default; `method_settings` sets a single
    method's own settings.
    """
    from adaptprune_jax import methods
    from adaptprune_jax.methods.base import UnsupportedBudget

    pairs = [Pair(UNPRUNED, num_image_tokens, None, None, float(num_image_tokens))]
    seen = {pairs[0].name}
    names = check_method_names(config.methods)
    own_settings = parse_method_settings(config.method_settings, [n for n in names if n != UNPRUNED])
    for method in names:
        if method == UNPRUNED:
            continue
        if config.layer is not None and not methods.get(method).has_layer:
            logger.warning(
                "%s has no pruning layer setting: --layer=%d does not apply to it", method, config.layer
            )
        for keep in config.keep:
            requested = parse_keep(keep)
            common = {"keep": requested, "layer": config.layer, "seed": config.seed}
            try:
                pruning = methods.make_config(method, strict=False, **common, **own_settings.get(method, {}))
            except UnsupportedBudget as error:
                logger.warning("skipping %s at keep=%s: %s", method, keep, error)
                continue
            pruning.validate(num_image_tokens, num_layers, layout)
            pair = Pair(
                method,
                pruning.resolve_keep(num_image_tokens),
                requested,
                pruning,
                pruning.equivalent_tokens(num_image_tokens, num_layers),
            )
            if pair.name in seen:
                logger.warning(
                    "%s: keep=%r resolves to %d tokens, already evaluated", method, keep, pair.keep
                )
                continue
            seen.add(pair.name)
            pairs.append(pair)
    return pairs
