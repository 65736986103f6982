"""The README's Python blocks run as written (from the repository root, one namespace, in order)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.slow  # the second block loads the testbed checkpoint and generates
def test_readme_python_blocks_run(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert np.asarray(namespace["kept"]).shape == (2, 64)
    assert len(namespace["answers"].texts) == 2 and np.asarray(namespace["answers"].kept).shape == (2, 64)
    assert os.getcwd() == str(REPO)
