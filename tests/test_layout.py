"""Dependencies point downward: entry points and evaluations/ -> erw/ -> models/. Read from each file's imports."""
import ast
import glob
import os

import pytest

from tests.conftest import ROOT

# package -> the top-level packages and entry-point modules its files must not import
FORBIDDEN = {
    "models": {"erw", "evaluations", "preprocessing", "bench", "train", "train_warmup", "sample_ddp", "demo", "launch"},
    "erw": {"evaluations", "preprocessing", "bench", "train", "train_warmup", "sample_ddp", "demo", "launch"},
}


def imported_packages(path):
    """Top-level names of every module a file imports (absolute imports; the codebase uses no relative ones)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downward(package):
    offenders = {os.path.relpath(path, ROOT): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted(glob.glob(os.path.join(ROOT, package, "*.py")))}
    assert {path: names for path, names in offenders.items() if names} == {}
