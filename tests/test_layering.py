"""The packages are layered: adaptprune_jax (pruning) <- models (the Flax LLaVA) <- experiments.

The pruning library is usable without the model and the model without the experiments, so an import
the wrong way is a bug even when it happens to work. Every import counts: at module level or inside a
function, `import x` or `from x import y`, relative ones resolved against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adaptprune_jax", "models", "experiments")
EXCLUDED = ("experiments/results",)  # run artefacts and one-off analysis scripts, not the code
# package -> the packages it must not import
FORBIDDEN = {"adaptprune_jax": ("models", "experiments"), "models": ("experiments",)}


def module_of(path: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's __init__) of a file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """(node, absolute module name) of every import statement anywhere in `tree`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue  # beyond the top-level package: Python refuses it anyway
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield node, target


def wrong_way_imports(source: str, module: str, is_package: bool = False, filename: str = "<string>"):
    """'file:line: <package> must not import <package>: <statement>' for each wrong-way import."""
    forbidden = FORBIDDEN.get(module.split(".")[0], ())
    tree = ast.parse(source, filename)
    problems = []
    for node, target in imported_modules(tree, module, is_package):
        top = target.split(".")[0]
        if top in forbidden:
            statement = ast.get_source_segment(source, node) or ast.unparse(node)
            problems.append(
                f"{filename}:{node.lineno}: {module.split('.')[0]} must not import {top}: {statement}"
            )
    return problems


def source_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not any(relative == excluded or relative.startswith(excluded + "/") for excluded in EXCLUDED):
                files.append(path)
    return files


def test_no_package_imports_a_layer_above_it():
    files = source_files()
    assert len(files) > 20, f"found only {len(files)} files under {', '.join(PACKAGES)}"
    problems = []
    for path in files:
        module, is_package = module_of(path)
        problems += wrong_way_imports(
            path.read_text(), module, is_package, filename=path.relative_to(ROOT).as_posix()
        )
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


SYNTHETIC = '''\
"""A module that breaks the layering in every way the checker must see."""
import numpy as np
from . import grid
from .configs import PruneConfig
import models.llava


def helper():
    from experiments.benchmarks import get_benchmark
    import experiments.eval as eval_lib
    return get_benchmark, eval_lib


class Thing:
    def method(self):
        from models import engine
        return engine
'''


def test_the_checker_reports_wrong_way_imports_with_file_and_line():
    problems = wrong_way_imports(SYNTHETIC, "adaptprune_jax.fake", filename="adaptprune_jax/fake.py")
    assert problems == [
        "adaptprune_jax/fake.py:5: adaptprune_jax must not import models: import models.llava",
        "adaptprune_jax/fake.py:9: adaptprune_jax must not import experiments: "
        "from experiments.benchmarks import get_benchmark",
        "adaptprune_jax/fake.py:10: adaptprune_jax must not import experiments: "
        "import experiments.eval as eval_lib",
        "adaptprune_jax/fake.py:16: adaptprune_jax must not import models: from models import engine",
    ]
    # models may import adaptprune_jax, but not experiments; experiments may import anything.
    assert len(wrong_way_imports(SYNTHETIC, "models.fake")) == 2
    assert wrong_way_imports(SYNTHETIC, "experiments.fake") == []


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from . import llava", "models.engine", False, "models"),
        ("from .. import experiments", "models.sub.x", False, "models"),
        ("from .configs import X", "adaptprune_jax", True, "adaptprune_jax.configs"),
        ("from ..benchmarks import io", "experiments.evaluation.pairs", False, "experiments.benchmarks"),
    ],
)
def test_relative_imports_resolve_against_the_importing_module(source, module, is_package, expected):
    ((_, target),) = imported_modules(ast.parse(source), module, is_package)
    assert target == expected
