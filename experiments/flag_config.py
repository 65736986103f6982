"""One config convention for every entry point: a frozen dataclass holds each setting, absl flags follow.

A setting is written once, as a dataclass field made by `setting` (default, help text, whether it is
required, its choices); `define_flags` derives one absl flag per such field from the field's type and
`from_flags` turns the parsed flags back into the dataclass. So the programmatic entry point
(`run(Config(...))`, what tests call) and the command line cannot drift apart.

    @dataclasses.dataclass(frozen=True)
    class Config:
        checkpoint: str = setting(dataclasses.MISSING, "Checkpoint directory.", required=True)
        keep: tuple[int | float, ...] = setting((64,), "Budgets: counts (64) or ratios (0.25).")
        dtype: str = setting("float32", "Compute dtype.", choices=("float32", "bfloat16"))

    if __name__ == "__main__":
        define_flags(Config)
        app.run(lambda argv: run(from_flags(Config)))

Flags are defined only by entry points (under `if __name__ == "__main__":` or in main), never when a
module is imported: several entry points use the same names (--seed, --dtype), and importing one for
its `run` must not claim them. Required settings are not marked required in absl, so every missing
one is reported in a single UsageError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Collection, Sequence
from typing import Any

from absl import app, flags

_HELP, _REQUIRED, _CHOICES = "help", "required", "choices"

# Flags defined here belong to the module that called define_flags (the entry point), so `--help`
# lists them as that program's own.
flags.disclaim_key_flags()


def setting(
    default: Any,
    help: str,
    *,
    required: bool = False,
    choices: Sequence[str] | None = None,
) -> Any:
    """A dataclass field that is also a flag. `default` may be `dataclasses.MISSING` (the constructor
    must be given it, which makes the flag required too); a list or tuple default is copied per
    instance, so mutable defaults are safe."""
    metadata = {_HELP: help, _REQUIRED: required, _CHOICES: None if choices is None else tuple(choices)}
    if isinstance(default, (list, tuple)):
        values = tuple(default)
        factory = (lambda: list(values)) if isinstance(default, list) else (lambda: values)
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# models.layers.ATTENTION_IMPLEMENTATIONS, spelt out here so that an entry point whose process never
# imports JAX (the benchmark's driver) can offer the flag; tests/experiments/test_flag_config.py checks
# that the two agree.
ATTENTION_CHOICES = ("einsum", "cudnn", "xla", "auto")


def attention_setting(note: str = "") -> Any:
    """The --attention setting the JAX entry points share (default auto), with an entry point's ``note``."""
    return setting(
        "auto",
        "How the vision tower, the LLM prefill and decoding attend (models.layers.self_attention, "
        "cache_attention): einsum (the "
        "position rule computed exactly, float32 logits: the parity path), cudnn (cuDNN's fused flash "
        "kernel, GPU, bfloat16), xla (the same fused call through XLA), auto (cudnn on a GPU in "
        "bfloat16, einsum otherwise). The pruning cues always use einsum." + note,
        choices=ATTENTION_CHOICES,
    )


def mesh_setting(note: str = "") -> Any:
    """The --mesh setting of the JAX entry points that run on several devices (models.sharding)."""
    return setting(
        "",
        "Devices, as data:N,model:M (models.sharding): a batch's rows split over data (padded to a "
        "multiple of it), the language model's attention heads, MLP columns and vocabulary over model "
        "(which must divide its KV heads); an axis not named has size 1; default: every device "
        "data-parallel." + note,
    )


# ---------------------------------------------------------------------------------------------
# Field types.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field's annotation asks of its flag: a scalar or a list of `element` values."""

    element: tuple[type, ...]  # str, bool, int, float, or (int, float) for 'int | float'
    is_list: bool


def _members(annotation) -> tuple:
    """The members of a union annotation (`X | Y`, `Optional[X]`), or the annotation alone; a `None`
    member only makes None the flag's possible default, so it is dropped by the caller."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _element_types(members: tuple, name: str) -> tuple[type, ...]:
    if members and set(members) <= {int, float}:
        return tuple(number_type for number_type in (int, float) if number_type in members)
    if len(members) == 1 and members[0] in (str, bool):
        return members
    raise TypeError(f"setting {name!r}: unsupported type {' | '.join(map(repr, members))} for a flag")


def _kind(annotation, name: str) -> _Kind:
    members = _members(annotation)
    members = tuple(member for member in members if member is not type(None))
    if len(members) == 1 and typing.get_origin(members[0]) is tuple:
        args = typing.get_args(members[0])
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"setting {name!r}: only tuple[X, ...] becomes a list flag, got {members[0]!r}")
        element = _element_types(_members(args[0]), name)
        if element == (bool,):
            raise TypeError(f"setting {name!r}: a list of bools is not supported")
        return _Kind(element, is_list=True)
    return _Kind(_element_types(members, name), is_list=False)


def _settings(config_class) -> list[tuple[dataclasses.Field, _Kind]]:
    """The fields made by `setting`, each with its flag kind, in field order."""
    hints = typing.get_type_hints(config_class)
    return [
        (field, _kind(hints[field.name], field.name))
        for field in dataclasses.fields(config_class)
        if _HELP in field.metadata
    ]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _is_required(field: dataclasses.Field) -> bool:
    no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    return bool(field.metadata[_REQUIRED]) or no_default


# ---------------------------------------------------------------------------------------------
# Config -> flags -> config.
# ---------------------------------------------------------------------------------------------


def define_flags(
    config_class, flag_values: flags.FlagValues = flags.FLAGS, *, skip: Collection[str] = ()
) -> flags.FlagValues:
    """Define one flag on `flag_values` per `setting` field of `config_class` not named in `skip`."""
    for field, kind in _settings(config_class):
        if field.name in skip:
            continue
        help_text = field.metadata[_HELP]
        choices = field.metadata[_CHOICES]
        if _is_required(field):
            default = None
            help_text = f"{help_text} (required)"
        else:
            default = _default(field)
        if choices is not None and (kind.is_list or kind.element != (str,)):
            raise TypeError(f"setting {field.name!r}: choices are only supported for a str setting")
        common = dict(flag_values=flag_values)
        if kind.is_list:
            shown = None if default is None else [str(value) for value in default]
            flags.DEFINE_list(field.name, shown, help_text, **common)
        elif choices is not None:
            flags.DEFINE_enum(field.name, default, list(choices), help_text, **common)
        elif kind.element == (str,):
            flags.DEFINE_string(field.name, default, help_text, **common)
        elif kind.element == (bool,):
            flags.DEFINE_bool(field.name, default, help_text, **common)
        elif kind.element == (int,):
            flags.DEFINE_integer(field.name, default, help_text, **common)
        elif kind.element == (float,):
            flags.DEFINE_float(field.name, default, help_text, **common)
        else:  # 'int | float' as a scalar has no absl flag type
            raise TypeError(f"setting {field.name!r}: a scalar int | float is not supported; use str")
    return flag_values


def _parse_number(text: Any, element: tuple[type, ...], name: str) -> int | float:
    """'64' -> 64 and '0.25' -> 0.25 for an 'int | float' list; an int or a float list takes only its own."""
    for number_type in element:
        try:
            return number_type(str(text).strip())
        except ValueError:
            continue
    wanted = " or ".join(number_type.__name__ for number_type in element)
    raise app.UsageError(f"--{name}: {text!r} is not a number ({wanted})")


def _convert(value: Any, kind: _Kind, name: str) -> Any:
    if value is None or not kind.is_list:
        return value
    if kind.element == (str,):
        return tuple(value)
    return tuple(_parse_number(item, kind.element, name) for item in value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and not value)


def from_flags(config_class, flag_values: flags.FlagValues = flags.FLAGS, **overrides):
    """The `config_class` instance of the flag values (lists as tuples, numbers parsed), `overrides` last.

    A setting without a flag on `flag_values` (skipped) keeps its dataclass default. Raises
    `app.UsageError` naming every required setting that has no value.
    """
    values: dict[str, Any] = {}
    missing = []
    for field, kind in _settings(config_class):
        if field.name in overrides:
            continue
        if field.name in flag_values:
            value = flag_values[field.name].value
        elif _is_required(field):
            value = None
        else:
            continue
        if _is_required(field) and _is_missing(value):
            missing.append(field.name)
            continue
        values[field.name] = _convert(value, kind, field.name)
    if missing:
        raise app.UsageError(f"missing required flag(s): {', '.join('--' + name for name in missing)}")
    return config_class(**{**values, **overrides})


@contextlib.contextmanager
def one_line_errors(program: str | None = None):
    """Input errors (a bad flag value, a missing file, a damaged checkpoint: the ValueErrors and
    OSErrors every check raises) end the program with one line and exit status 1, not a traceback.
    `-v 1` (absl's verbosity) lets them through with their traceback."""
    try:
        yield
    except (ValueError, OSError, app.UsageError) as error:
        if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
            raise
        name = program or sys.argv[0]
        hint = " (see --help)" if isinstance(error, app.UsageError) else " (-v 1 shows the traceback)"
        print(f"{name}: error: {error}{hint}", file=sys.stderr)
        sys.exit(1)


def run_program(config_class: type, run: Any) -> None:
    """Run ``run(config)`` as an absl program whose flags are ``config_class``'s (call it under
    ``if __name__ == "__main__":``); the program's own arguments beyond the flags are refused."""
    define_flags(config_class)

    def main(argv: Sequence[str]) -> None:
        with one_line_errors():
            if len(argv) > 1:
                raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
            run(from_flags(config_class))

    app.run(main)
