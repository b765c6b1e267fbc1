"""Every command in README.md and docs/*.md parses with its entry point's own parser (the tiny recipe and the demo run
for real in tests/test_demo.py): a renamed flag, a moved script or a config key that no longer exists breaks a test,
not a user's copy-paste."""
import glob
import os
import re
import shlex

import pytest

from operations.config import TRAIN, WARMUP, resolve_config
from tests.conftest import ROOT
from tests.test_configs import expand_shell

DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# How a command line begins; a block whose first line begins so is a block of commands (others are formulas or
# folder trees), and each of its lines is a command, shell (SHELL) or a comment.
PROGRAMS = ("python ", "python3 ", "torchrun ", "accelerate ", "srun ", "pip ", "ruff ", "hf ", "for ", "#")
SHELL = re.compile(r"^(#SBATCH|\[ |[A-Z_]+=\S)")
# Commands of other programs the docs show, as they begin.
OTHERS = ("pip ", "ruff ", "hf ", "python -m pytest ")


def code_blocks(text: str):
    """Indented blocks (four spaces, after a blank line) and ```sh blocks."""
    fenced = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    indented = re.findall(r"(?:^|\n)\n((?: {4}.*(?:\n|$))+)", text)
    return fenced + ["\n".join(line[4:] for line in block.splitlines()) for block in indented]


def doc_commands():
    found = []
    for path in DOCS:
        with open(path) as f:
            text = f.read()
        for block in code_blocks(text):
            if not block.lstrip().startswith(PROGRAMS):
                continue
            for command in expand_shell(block):
                if SHELL.match(command):
                    continue
                assert command.startswith(PROGRAMS), f"{path}: {command}"
                found += [(os.path.relpath(path, ROOT), part.strip()) for part in command.split("&&")]
    return found


def entry_point_and_args(words):
    """(script or -m module, its arguments) of a command line: through launch.py, srun, torchrun, accelerate launch
    or python, whose own options are skipped."""
    words = [w for w in words if not w.startswith("$")]  # a shell variable (e.g. $RESUME) adds a flag or nothing
    while words:
        head = words[0]
        if head.endswith(".py"):
            return os.path.basename(head), words[1:]
        if head == "-m":
            return words[1], words[2:]
        if head == "launch" and words[1:2] == ["launch"]:  # "accelerate launch": skip the sub-command
            words = words[1:]
        words = words[1:]
    raise AssertionError("no script or module")


def parse(program, args):
    from evaluations import cknna, demo_metrics, evaluator
    from preprocessing import dataset_tools
    import bench.run
    import demo
    import sample_ddp
    from tests.mutation import run as mutation_run
    if program in ("train.py", "train_warmup.py"):
        argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in args]
        return resolve_config(TRAIN if program == "train.py" else WARMUP, argv)
    if program == "launch.py":
        return parse(*entry_point_and_args(args))
    parsers = {"sample_ddp.py": sample_ddp.build_parser, "demo.py": demo.build_parser,
               "preprocessing.dataset_tools": dataset_tools.build_parser,
               "evaluations.evaluator": evaluator.build_parser, "evaluations.cknna": cknna.build_parser,
               "evaluations.demo_metrics": demo_metrics.build_parser, "bench.run": bench.run.build_parser,
               "tests.mutation.run": mutation_run.build_parser}
    assert program in parsers, f"no parser known for {program}"
    return parsers[program]().parse_args(args)


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_of_every_stage():
    programs = {entry_point_and_args(shlex.split(c))[0] for _, c in COMMANDS if not c.startswith(OTHERS)}
    assert {"train.py", "train_warmup.py", "sample_ddp.py", "launch.py", "preprocessing.dataset_tools",
            "evaluations.evaluator", "evaluations.cknna", "bench.run"} <= programs


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_every_command_of_the_docs_parses(where, command):
    if command.startswith(OTHERS):
        return
    parse(*entry_point_and_args(shlex.split(command)))
