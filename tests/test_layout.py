"""Dependencies point downward: entry points and tools -> operations/ and erw/loop.py -> the science (models/ and
the science modules of erw/), which imports no operations. Read from each file's imports."""
import ast
import glob
import os

import pytest

from tests.conftest import ROOT

ENTRY_POINTS = {"train", "train_warmup", "sample_ddp", "demo", "launch"}
TOOLS = {"evaluations", "preprocessing", "bench"}
# The science a researcher forks to change: it refuses bad input with ValueError / FileNotFoundError and knows
# nothing of run folders, locks, exit codes or the command line.
SCIENCE = ["models/*.py"] + [f"erw/{name}.py" for name in ("losses", "transport", "samplers", "batch_random", "data",
                                                          "warm_start", "generation", "step", "precision")]
# files -> the top-level packages and entry-point modules they must not import
FORBIDDEN = {
    **{pattern: {"operations", "erw", "evaluations", "preprocessing", "bench"} | ENTRY_POINTS
       for pattern in ["models/*.py"]},
    **{pattern: {"operations"} | TOOLS | ENTRY_POINTS for pattern in SCIENCE[1:]},
    "erw/*.py": TOOLS | ENTRY_POINTS,
    "operations/*.py": TOOLS | ENTRY_POINTS,
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


def _modules_of(path):
    """Every module a file imports, dotted ("erw.loop"), at the top or inside a function."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("pattern", sorted(FORBIDDEN))
def test_imports_point_downward(pattern):
    files = sorted(glob.glob(os.path.join(ROOT, pattern)))
    assert files, pattern
    offenders = {os.path.relpath(path, ROOT): sorted(imported_packages(path) & FORBIDDEN[pattern]) for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_science_imports_no_operations_and_not_the_loop():
    """The science modules are the part a researcher changes; erw/loop.py, which reaches the operations, sits above
    them."""
    science = [path for pattern in SCIENCE for path in glob.glob(os.path.join(ROOT, pattern))]
    offenders = {os.path.relpath(path, ROOT): sorted(m for m in _modules_of(path)
                                                      if m.startswith(("operations", "erw.loop")))
                 for path in science}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_launch_imports_only_the_operations_package():
    """launch.py wraps the launchers before anything heavy is imported: the standard library and operations/."""
    ours = imported_packages(os.path.join(ROOT, "launch.py")) & ({"erw", "models", "operations", "torch"} | TOOLS)
    assert ours == {"operations"}


def _python_files():
    return [path for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
            if not os.path.relpath(path, ROOT).startswith("tests")]


def test_the_bottom_modules_import_no_torch_and_nothing_of_ours():
    """operations/files.py (atomic writes) and operations/preemption.py (signals, exit statuses) are imported by
    everything, launch.py and the entry points' first line included, before torch: they import no torch and none of
    our modules (operations/files.py may not even import operations/preemption.py; it writes .npz files with numpy)."""
    for name in ("files", "preemption"):
        path = os.path.join(ROOT, "operations", f"{name}.py")
        heavy = {"torch", "erw", "models", "operations", "evaluations"} | ({"numpy"} if name == "preemption" else set())
        assert imported_packages(path) & heavy == set(), name


def _string_constants(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_run_folders_file_names_have_one_home():
    """Only operations/run.py spells the experiment folder's files; everyone else imports its names."""
    names = {"config.yaml", "config_history.yaml", "log.txt", "metrics.jsonl", "run.lock"}
    spelled = {os.path.relpath(path, ROOT): sorted(names & set(_string_constants(path))) for path in _python_files()}
    assert {path: found for path, found in spelled.items() if found} == {
        os.path.join("operations", "run.py"): ["config.yaml", "config_history.yaml", "log.txt", "metrics.jsonl"],
        os.path.join("operations", "lock.py"): ["run.lock"]}


def test_the_checkpoint_folders_names_have_one_home():
    """Only operations/checkpoint.py spells the checkpoint names (last.pt, NNNNNNN.pt); everyone else asks it."""
    spelled = {}
    for path in _python_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value == "last.pt" or r"(\d{7,})\.pt" in node.value):
                spelled.setdefault(os.path.relpath(path, ROOT), []).append(node.value)
            if isinstance(node, ast.JoinedStr) and any(  # f"{step:07d}.pt"
                    isinstance(part, ast.Constant) and str(part.value).startswith(".pt") for part in node.values):
                spelled.setdefault(os.path.relpath(path, ROOT), []).append(ast.unparse(node))
    assert set(spelled) == {os.path.join("operations", "checkpoint.py")}, spelled


def test_data_folders_hold_no_code():
    """assets/ and configs/ are data; the code that makes them lives with the code (preprocessing/, ...)."""
    assert [path for folder in ("assets", "configs")
            for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)] == []


def test_our_modules_import_each_other_without_a_circle():
    """Over erw/ and operations/: hiding an import inside a function hides a circle, it does not remove it."""
    ours = {os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."): path for package in ("erw", "operations")
            for path in glob.glob(os.path.join(ROOT, package, "*.py"))}
    graph = {module: {m for m in _modules_of(path) if m in ours} for module, path in ours.items()}
    state, circle = {}, []

    def visit(module, trail):
        if state.get(module) == "done" or circle:
            return
        if state.get(module) == "open":
            circle.extend(trail[trail.index(module):] + [module])
            return
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert circle == [], " -> ".join(circle)


def _sys_path_edits(path):
    """Lines that change sys.path (insert/append/assignment) in a file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("insert", "append", "extend") and ast.unparse(node.func.value) == "sys.path"]


def test_no_script_edits_sys_path_to_import_the_repository():
    """Scripts in packages run as modules from the repository root (`python -m evaluations.evaluator`), the root
    scripts as files there: the root is importable without edits."""
    edits = {os.path.relpath(path, ROOT): _sys_path_edits(path)
             for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)}
    assert {path: lines for path, lines in edits.items() if lines} == {}


def test_nothing_imports_bench():
    """bench/ is a benchmark users run: the code and the other tests do not depend on it (its own test aside)."""
    importers = [os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
                 if "bench" in imported_packages(path)]
    assert sorted(importers) == [os.path.join("bench", "run.py"), os.path.join("tests", "test_bench.py"),
                                 os.path.join("tests", "test_docs.py")]
