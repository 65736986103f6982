"""The registry of pruning methods: one file per method in this package, each registering its config.

Every consumer (the eval harness, validate's ``--method``, the benchmark, the PyTorch reference and
the registry-parametrized tests) reads this registry, so a method added here, or in any module that
calls ``register`` and is imported with ``import_plugins``, is available everywhere without edits.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Iterable
from typing import Any

from adaptprune_jax.methods.base import PruneConfig

_REGISTRY: dict[str, type[PruneConfig]] = {}
METHODS: types.MappingProxyType[str, type[PruneConfig]] = types.MappingProxyType(_REGISTRY)
"""name -> config class, live (plugins registered later appear here too)."""


def register(config_class: type[PruneConfig]) -> type[PruneConfig]:
    """Class decorator: add a method's config class to the registry under its ``name``."""
    name = getattr(config_class, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or name == "none":
        raise ValueError(f"a method needs a lower-case name other than 'none', got {name!r}.")
    if _REGISTRY.get(name, config_class) is not config_class:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__module__}).")
    _REGISTRY[name] = config_class
    return config_class


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[PruneConfig]:
    """The config class of method ``name``; ValueError listing the known names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(names())}.")
    return _REGISTRY[name]


def setting_names(name: str) -> list[str]:
    """The settings (dataclass fields) method ``name`` takes."""
    return sorted(field.name for field in dataclasses.fields(get(name)))


def make_config(name: str, *, strict: bool = True, **settings: Any) -> PruneConfig:
    """Build the config of method ``name``.

    strict (default): an unknown setting raises, naming the known ones. strict=False: settings the
    method does not have, and settings given as None, are dropped (for harnesses that pass common
    settings such as ``layer`` or ``seed`` to every method).
    """
    config_class = get(name)
    known = set(setting_names(name))
    if not strict:
        settings = {key: value for key, value in settings.items() if key in known and value is not None}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} for {name}; known settings: {', '.join(sorted(known))}."
        )
    return config_class(**settings)


def import_plugins(modules: Iterable[str]) -> None:
    """Import modules that register methods of their own (e.g. a method defined in a test module)."""
    for module in modules:
        module = module.strip()
        if module:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ValueError(f"cannot import method module {module!r}: {error}") from error


# The built-in methods register themselves on import.
from adaptprune_jax.methods import (  # noqa: E402, F401
    adaptprune,
    cdpruner,
    dart,
    divprune,
    fastv,
    fixed,
    pyramiddrop,
    random,
    sparsevlm,
    uniform,
    visionzip,
    vispruner,
)
