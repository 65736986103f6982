"""experiments.flag_config: flags derived from a config dataclass, and parsed flags back into it."""

from __future__ import annotations

import dataclasses

import pytest
from absl import app, flags

from experiments.flag_config import define_flags, from_flags, setting


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str = setting(dataclasses.MISSING, "Checkpoint directory.", required=True)
    output_dir: str | None = setting(None, "Where results go.", required=True)
    name: str = setting("run", "Run name.")
    image_dir: str | None = setting(None, "Image folder.")
    dtype: str = setting("float32", "Compute dtype.", choices=("float32", "bfloat16"))
    batch_size: int = setting(8, "Batch size.")
    limit: int | None = setting(None, "First N questions.")
    tolerance: float = setting(1e-5, "Tolerance.")
    scale: float | None = setting(None, "Scale.")
    random_weights: bool = setting(False, "Random weights.")
    methods: tuple[str, ...] = setting(("adaptprune", "fastv"), "Methods.")
    keep: tuple[int | float, ...] = setting((64, 0.25), "Budgets.")
    layers: tuple[int, ...] = setting([2, 3], "Layers (a list default).")
    sigmas: tuple[float, ...] | None = setting(None, "Sigmas.")
    command: str | None = None  # not a setting, so not a flag
    hidden: int = setting(1, "Defined only when not skipped.")


REQUIRED = ["--checkpoint=ckpt", "--output_dir=out"]


def parsed(args, skip=()):
    flag_values = define_flags(Config, flags.FlagValues(), skip=skip)
    flag_values(["prog", *args])
    return flag_values


def test_one_flag_per_setting_with_its_type_and_help():
    flag_values = define_flags(Config, flags.FlagValues(), skip=("hidden",))
    names = {field.name for field in dataclasses.fields(Config)} - {"command", "hidden"}
    assert set(flag_values) == names
    types = {name: flag_values[name].flag_type() for name in names}
    assert types["name"] == types["image_dir"] == "string"
    assert types["dtype"] == "string enum" and flag_values["dtype"].parser.enum_values == [
        "float32",
        "bfloat16",
    ]
    assert types["batch_size"] == types["limit"] == "int"
    assert types["tolerance"] == types["scale"] == "float"
    assert types["random_weights"] == "bool"
    assert {types[name] for name in ("methods", "keep", "layers", "sigmas")} == {
        "comma separated list of strings"
    }
    assert flag_values["name"].help == "Run name."
    assert flag_values["checkpoint"].help == "Checkpoint directory. (required)"
    assert flag_values["checkpoint"].default is None and flag_values["output_dir"].default is None
    assert flag_values["limit"].default is None and flag_values["sigmas"].default is None
    assert flag_values["keep"].default == ["64", "0.25"]


def test_defaults_give_the_dataclass_defaults():
    config = from_flags(Config, parsed(REQUIRED))
    assert config == Config(checkpoint="ckpt", output_dir="out", layers=(2, 3))
    assert config.keep == (64, 0.25) and type(config.keep[0]) is int and type(config.keep[1]) is float
    assert config.layers == (2, 3) and config.methods == ("adaptprune", "fastv")


def test_values_are_converted_to_the_field_types():
    config = from_flags(
        Config,
        parsed(
            [
                *REQUIRED,
                "--dtype=bfloat16",
                "--batch_size=4",
                "--limit=10",
                "--tolerance=1e-4",
                "--random_weights",
                "--methods=divprune",
                "--keep=192,0.25, 32",
                "--layers=5",
                "--sigmas=1,0.5",
            ]
        ),
    )
    assert config.dtype == "bfloat16" and config.batch_size == 4 and config.limit == 10
    assert config.tolerance == 1e-4 and config.random_weights is True
    assert config.methods == ("divprune",)
    assert config.keep == (192, 0.25, 32) and [type(k) for k in config.keep] == [int, float, int]
    assert config.layers == (5,)
    assert config.sigmas == (1.0, 0.5) and type(config.sigmas[0]) is float


def test_overrides_apply_last_and_reach_non_flag_fields():
    config = from_flags(Config, parsed(REQUIRED), command="prog --x", batch_size=2, checkpoint="other")
    assert config.command == "prog --x" and config.batch_size == 2 and config.checkpoint == "other"


def test_an_override_supplies_a_required_setting():
    config = from_flags(Config, parsed(["--checkpoint=ckpt"]), output_dir="given")
    assert config.output_dir == "given"


def test_missing_required_flags_are_reported_together():
    with pytest.raises(app.UsageError, match=r"^missing required flag\(s\): --checkpoint, --output_dir$"):
        from_flags(Config, parsed([]))
    with pytest.raises(app.UsageError, match=r"^missing required flag\(s\): --output_dir$"):
        from_flags(Config, parsed(["--checkpoint=ckpt", "--output_dir="]))


def test_a_skipped_setting_keeps_its_default():
    flag_values = parsed(REQUIRED, skip=("hidden",))
    assert "hidden" not in flag_values
    assert from_flags(Config, flag_values).hidden == 1


def test_choices_are_enforced_by_the_flag():
    flag_values = define_flags(Config, flags.FlagValues())
    with pytest.raises(flags.IllegalFlagValueError):
        flag_values(["prog", *REQUIRED, "--dtype=float16"])


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--keep=64,half", r"--keep: 'half' is not a number \(int or float\)"),
        ("--layers=2.5", r"--layers: '2.5' is not a number \(int\)"),
        ("--sigmas=wide", r"--sigmas: 'wide' is not a number \(float\)"),
    ],
)
def test_a_bad_number_in_a_list_names_the_flag(arg, message):
    with pytest.raises(app.UsageError, match=message):
        from_flags(Config, parsed([*REQUIRED, arg]))


def test_list_defaults_are_not_shared_between_instances():
    first, second = Config(checkpoint="a", output_dir="b"), Config(checkpoint="a", output_dir="b")
    assert first.layers == [2, 3] and first.layers is not second.layers


def test_flagfile_round_trip(tmp_path):
    args = [*REQUIRED, "--dtype=bfloat16", "--keep=192,0.25", "--limit=3", "--random_weights", "--sigmas=2"]
    original = parsed(args)
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("# a comment line, as the shipped flagfiles have\n" + original.flags_into_string())
    again = parsed([f"--flagfile={flagfile}"])
    assert from_flags(Config, again) == from_flags(Config, original)
    # A command-line flag after the flagfile overrides it.
    assert from_flags(Config, parsed([f"--flagfile={flagfile}", "--limit=9"])).limit == 9


def test_unsupported_types_and_choices_fail_at_definition():
    @dataclasses.dataclass(frozen=True)
    class Scalar:
        keep: int | float = setting(64, "A scalar count or ratio has no absl type.")

    @dataclasses.dataclass(frozen=True)
    class ListChoices:
        methods: tuple[str, ...] = setting(("a",), "Choices on a list.", choices=("a", "b"))

    @dataclasses.dataclass(frozen=True)
    class Mapping:
        table: dict = setting(None, "No flag type.")

    for config_class, message in (
        (Scalar, "scalar int | float"),
        (ListChoices, "choices are only supported for a str"),
        (Mapping, "unsupported type"),
    ):
        with pytest.raises(TypeError, match=message):
            define_flags(config_class, flags.FlagValues())


def test_flags_belong_to_the_module_that_defines_them():
    """So an entry point's --help lists them as its own, not as flag_config's."""
    flag_values = define_flags(Config, flags.FlagValues())
    by_module = flag_values.flags_by_module_dict()
    assert "experiments.flag_config" not in by_module
    assert {flag.name for flag in by_module[__name__]} >= {"checkpoint", "keep"}


def test_the_attention_flag_offers_the_models_implementations_on_every_jax_entry_point():
    """--attention (default auto) on eval, validate and the benchmark, whose choices are the model's
    (spelt out in flag_config so the benchmark's driver need not import JAX); a bad value is refused."""
    from experiments.benchmark.configs import BenchmarkConfig
    from experiments.evaluation.config import EvalConfig
    from experiments.flag_config import ATTENTION_CHOICES
    from experiments.validate import ValidateConfig
    from models.layers import ATTENTION_IMPLEMENTATIONS

    assert ATTENTION_CHOICES == ATTENTION_IMPLEMENTATIONS
    for config_class in (EvalConfig, ValidateConfig, BenchmarkConfig):
        flag_values = define_flags(config_class, flags.FlagValues())
        assert flag_values["attention"].default == "auto"
        assert flag_values["attention"].parser.enum_values == list(ATTENTION_IMPLEMENTATIONS)
        with pytest.raises(flags.IllegalFlagValueError, match=r"one of <einsum\|cudnn\|xla\|auto>"):
            flag_values(["prog", "--attention=flash"])
