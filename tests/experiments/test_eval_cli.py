"""The eval program as a user meets it: `--help` names the methods and the required flags, and a bad
flag value ends in one line naming the problem, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import flags

from adaptprune_jax import methods
from experiments import eval as eval_lib
from experiments import flag_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.eval", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_the_methods_and_marks_the_required_flags():
    flag_values = eval_lib.define_flags(flags.FlagValues())
    for name in ("checkpoint", "benchmark", "questions", "output_dir"):
        assert flag_values[name].help.endswith("(required)")
    assert not flag_values["methods"].help.endswith("(required)")
    for name in methods.names():
        assert name in flag_values["methods"].help


@pytest.mark.slow
def test_bad_flags_end_in_one_line(tmp_path):
    """An unknown method (a ValueError deep in the run) and a missing required flag (a usage error):
    each one line on stderr with what is wrong, exit status 1."""
    unknown = run_eval(
        f"--checkpoint={tmp_path}",
        "--benchmark=pope",
        f"--questions={tmp_path}",
        f"--output_dir={tmp_path / 'out'}",
        "--methods=fastv,tome",
    )
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr
    (line,) = [line for line in unknown.stderr.splitlines() if "error" in line]
    assert line.startswith("experiments.eval: error: unknown method 'tome'; known methods:")
    missing = run_eval("--benchmark=pope")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "missing required flag(s): --checkpoint, --questions, --output_dir" in missing.stderr
    assert "--help" in missing.stderr


def test_verbosity_lets_the_traceback_through():
    """`-v 1` re-raises, so a developer still gets the traceback."""
    flag_values = flags.FLAGS
    was_parsed = flag_values.is_parsed()
    if not was_parsed:
        flag_values(["test"])
    old = flag_values.verbosity
    try:
        flag_values.verbosity = 1
        with pytest.raises(ValueError, match="boom"), flag_config.one_line_errors("x"):
            raise ValueError("boom")
        flag_values.verbosity = 0
        with pytest.raises(SystemExit) as exit_info, flag_config.one_line_errors("x"):
            raise ValueError("boom")
        assert exit_info.value.code == 1
    finally:
        flag_values.verbosity = old
        if not was_parsed:
            flag_values.unparse_flags()
