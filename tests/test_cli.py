"""First contact with the command line (operations/cli.py and every entry point): --help shows each default and choice,
errors from user input are one line with exit status 2 and leave nothing behind, the flag names of REPA, DiT and
SiT get a hint that names a real flag, console logging goes through tqdm, and each warning prints once."""
import argparse
import io
import logging
import os
import re
import subprocess
import sys

import pytest
from tqdm import tqdm

from operations import cli
from tests.conftest import ROOT, tiny_args


def entry_point_parsers():
    """{command: parser} of every entry point, the subcommands of dataset_tools.py included."""
    import demo
    import sample_ddp
    from operations.config import TRAIN, WARMUP, build_parser
    from evaluations import cknna, demo_metrics, evaluator
    from preprocessing import dataset_tools
    parsers = {"train_warmup.py": build_parser(WARMUP, ""), "train.py": build_parser(TRAIN, ""),
               "sample_ddp.py": sample_ddp.build_parser(), "demo.py": demo.build_parser(),
               "-m evaluations.evaluator": evaluator.build_parser(), "-m evaluations.cknna": cknna.build_parser(),
               "-m evaluations.demo_metrics": demo_metrics.build_parser()}
    tools = dataset_tools.build_parser()
    commands = next(a for a in tools._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update({f"-m preprocessing.dataset_tools {name}": p for name, p in commands.choices.items()})
    return parsers


PARSERS = entry_point_parsers()


def rendered_help(parser, action) -> str:
    """The help line of one option as --help prints it (defaults expanded)."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_shows_every_default_and_choice(command):
    from operations.config import OPTIONS_BY_NAME
    parser = PARSERS[command]
    text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        line = rendered_help(parser, action)
        if not action.required:
            assert "default" in line, f"{command} {action.option_strings[0]}: no default in {line!r}"
        # Choices: argparse's own (shown as {a,b} in the usage) or, for the training flags whose values the config
        # checks, listed in the help line.
        option = OPTIONS_BY_NAME.get(action.dest)
        choices = action.choices or (option.choices if option is not None else None)
        shown_as_a_set = f"{{{','.join(map(str, action.choices or ()))}}}" in text
        shown_as_a_range = isinstance(action.metavar, str) and re.fullmatch(r"\d+-\d+", action.metavar)
        for choice in choices or ():
            assert str(choice) in line or shown_as_a_set or shown_as_a_range, \
                f"{command} {action.option_strings[0]}: choice {choice!r} not shown"
    assert cli.ArgumentParser in type(parser).__mro__  # the hints below apply to every entry point


def test_train_help_lists_the_choices_of_the_alignment_loss():
    # The example a user met: train.py --help listed no choices.
    line = next(rendered_help(PARSERS["train.py"], a) for a in PARSERS["train.py"]._actions
                if a.dest == "align_loss")
    assert "choices: ntxent, cosine" in line and "default: ntxent" in line


def every_flag():
    return {flag for parser in PARSERS.values() for a in parser._actions for flag in a.option_strings}


@pytest.mark.parametrize("theirs", sorted(cli.FLAG_HINTS))
def test_flags_of_other_codebases_get_a_hint_naming_a_real_flag(theirs, capsys):
    hint = cli.FLAG_HINTS[theirs]
    assert theirs not in every_flag()  # a hint for a flag we have would shadow it
    named = re.findall(r"--[a-z0-9-]+", hint)
    assert named and set(named) <= every_flag(), f"{theirs}: hint names {set(named) - every_flag()}, not flags here"
    parser = PARSERS["sample_ddp.py"]
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["--ckpt", "x.pt", theirs, "5"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert f"hint: {theirs} is not a flag here; use {hint}" in err


@pytest.mark.parametrize("given, expected", [
    (["--resume-step", "5"], "use --resume"),
    (["--num-sampling-steps=50"], "use --num-steps"),
    (["--image-size", "256"], "use --resolution"),
    (["--tf32"], "use --allow-tf32"),
    (["--sampling-steps", "5000"], "use --sample-grid-every"),  # REPA's name for the grid interval
])
def test_the_issue_examples_on_train_py(given, expected, capsys):
    with pytest.raises(SystemExit):
        PARSERS["train.py"].parse_args(given)
    assert expected in capsys.readouterr().err


def test_sit_positional_sampler_word_gets_a_hint(capsys):
    with pytest.raises(SystemExit):
        PARSERS["sample_ddp.py"].parse_args(["SDE", "--ckpt", "x.pt"])
    assert "'SDE' is SiT's way to choose the sampler; here use --mode sde" in capsys.readouterr().err


def test_an_unknown_flag_without_a_hint_is_argparses_plain_error(capsys):
    with pytest.raises(SystemExit):
        PARSERS["train.py"].parse_args(["--no-such-flag"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "hint" not in err


def run_entry(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "ERW_DEBUG": ""}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def in_process_error(module, argv, capsys) -> str:
    """The entry point's run_main(main) in this process: exit status 2 and one `error:` line, no traceback."""
    from operations.cli import run_main
    with pytest.raises(SystemExit) as exited:
        run_main(module.main, argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_user_input_errors_of_training_are_one_line_and_write_nothing(demo_data, tmp_path, monkeypatch, capsys):
    import train
    import train_warmup
    monkeypatch.setenv("ERW_DEBUG", "")
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    out = str(tmp_path / "exps")
    common = ["--config", config, "--output-dir", out]
    # As typed, for both entry points (their `__main__` goes through run_main); the DEPTH error names the user's
    # flag, not the model's constructor argument.
    line = one_line_error(run_entry([os.path.join(ROOT, "train_warmup.py"), *common, "--warmup-depth", "9"], tmp_path))
    assert line == "error: --warmup-depth 9 is outside 1..4: SiT-Tiny/2 has 4 blocks"
    line = one_line_error(run_entry([os.path.join(ROOT, "train.py"), *common, "--warmup-ckpt", "none",
                                     "--encoder-depth", "7"], tmp_path))
    assert line == "error: --encoder-depth 7 is outside 1..4: SiT-Tiny/2 has 4 blocks"
    missing = str(tmp_path / "phase1" / "last.pt")
    line = in_process_error(train, [*common, "--data-dir", str(demo_data), "--enc-type", "random-vit-tiny",
                                    "--warmup-ckpt", missing], capsys)
    assert missing in line and "run Phase 1 first (train_warmup.py" in line
    line = in_process_error(train_warmup, ["--config", str(tmp_path / "no.yaml")], capsys)
    assert str(tmp_path / "no.yaml") in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: many\n")
    line = in_process_error(train_warmup, ["--config", str(bad)], capsys)
    assert "batch_size" in line and "many" in line
    assert not os.path.exists(out)


@pytest.mark.parametrize("script, flags, says", [
    ("train_warmup", ["--data-dir", "{tmp}/nodata"], "data folder {tmp}/nodata does not exist"),
    ("train_warmup", ["--enc-type", "no-such-teacher"], "unknown teacher 'no-such-teacher' in --enc-type"),
    ("train_warmup", ["--resolution", "128"], "holds 64px images but --resolution is 128"),
    ("train_warmup", ["--batch-size", "320"], "holds 160 items, fewer than one micro-batch of 320"),
    ("train_warmup", ["--output-dir", "{tmp}/a-file"], "--output-dir/--exp-name {tmp}/a-file/tiny-warmup: "
                                                        "{tmp}/a-file is a file, not a folder"),
    ("train_warmup", ["--output-dir", "{tmp}/a-file/under"], "{tmp}/a-file is a file, not a folder"),
    ("train", ["--warmup-ckpt", "{tmp}/phase2.pt"], "{tmp}/phase2.pt is not a Phase-1 checkpoint"),
    ("sample_ddp", ["--ckpt", "{tmp}/phase2.pt", "--sample-dir", "{tmp}/a-file"],
     "--sample-dir {tmp}/a-file: {tmp}/a-file is a file, not a folder"),
], ids=["no-data", "unknown-teacher", "resolution", "batch-over-dataset", "output-dir-a-file",
        "output-dir-under-a-file", "not-a-phase1-checkpoint", "sample-dir-a-file"])
def test_inputs_are_checked_before_anything_is_written(demo_data, tmp_path, capsys, monkeypatch, script, flags,
                                                       says):
    """Refused in one line before the experiment (or sample) folder exists: before, a run made exps/NAME/ with its
    config.yaml and log.txt, or a NotADirectoryError traceback, first."""
    import sample_ddp
    import train
    import train_warmup
    from operations.checkpoint import save_checkpoint
    from models.sit import create_sit
    monkeypatch.setenv("ERW_DEBUG", "")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    (tmp_path / "a-file").write_text("not a folder")
    model_args = dict(model="SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10, cfg_prob=0.1,
                      encoder_depth=2, z_dims=[64], qk_norm=False, use_rope=False, built_depth=None)
    save_checkpoint({"model": create_sit(**model_args).state_dict(), "ema": {}, "model_args": model_args},
                    str(tmp_path / "phase2.pt"))
    module = {"train_warmup": train_warmup, "train": train, "sample_ddp": sample_ddp}[script]
    argv = [*map(fill, flags)] if script == "sample_ddp" else \
        [*tiny_args(demo_data, tmp_path / "exps", "--max-train-steps", "1"), *map(fill, flags)]
    line = in_process_error(module, argv, capsys)
    assert fill(says) in line
    assert sorted(os.listdir(tmp_path)) == ["a-file", "phase2.pt"]


@pytest.mark.parametrize("command", ["train_warmup.py", "dataset_tools pack", "dataset_tools encode"])
def test_an_input_error_in_a_loader_worker_is_the_one_line_it_is_without_workers(demo_data, tmp_path, command):
    """Before: "error: Caught InvalidInput in DataLoader worker process 0." and the worker's 15-line traceback. A
    science error (a latent's ValueError, through refusals) and an operations one (encode's InvalidInput, straight to
    run_main) alike."""
    import shutil

    import numpy as np
    from PIL import Image
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    if command == "dataset_tools encode":
        bad = sorted((data / "images").rglob("*.png"))[37]
        Image.new("RGB", (32, 32)).save(bad)
        shape = "is 32x32"
    else:
        bad = sorted((data / "vae-sd").rglob("*.npy"))[37]
        np.save(bad, np.zeros((8, 4, 4), np.float32))  # a 32-px image's latent among 64-px ones
        shape = "(8, 4, 4)"
    lines = []
    for workers in ("0", "2"):
        if command == "train_warmup.py":
            args = [os.path.join(ROOT, "train_warmup.py"),
                    *tiny_args(data, tmp_path / f"exps{workers}", "--num-workers", workers, "--max-train-steps", "10")]
        elif command == "dataset_tools encode":
            args = ["-m", "preprocessing.dataset_tools", "encode", "--source", str(data / "images"), "--dest",
                    str(tmp_path / f"vae{workers}"), "--vae", "random-tiny", "--workers", workers, "--device", "cpu"]
        else:
            args = ["-m", "preprocessing.dataset_tools", "pack", "--data-dir", str(data), "--workers", workers]
        result = run_entry(args, ROOT)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and result.stderr.rstrip().endswith("\n" + errors[0]), result.stderr
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert str(bad) in lines[0] and shape in lines[0]


# train_warmup.py, with rank 1 ending slowly once it has failed (as one with loader workers and files to close does):
# it drops its connections first, so its peer notices at once and could end before it.
_SLOW_TO_END = """import atexit, os, sys, time
sys.path.insert(0, {root!r})
from operations.preemption import catch_early_preemption
catch_early_preemption()
import torch.distributed as dist
import train_warmup
from operations.cli import run_main
if os.environ["RANK"] == "1":
    atexit.register(lambda: (dist.destroy_process_group(), time.sleep(3)))
run_main(train_warmup.main)
"""


def test_under_torchrun_the_failing_process_is_the_root_cause_with_its_one_line(demo_data, tmp_path):
    """An unreadable image in rank 1's first batch. Before: torchrun's summary, the last thing printed, named rank 0
    (its gloo "Connection closed by peer") as the root cause, and no process's error."""
    import itertools
    import shutil

    from erw.data import ImageLatentDataset, ResumableShardSampler
    from tests.dist_utils import free_port
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    dataset = ImageLatentDataset(str(data))
    first = [list(itertools.islice(ResumableShardSampler(len(dataset), 16, rank, 2, 0), 16)) for rank in (0, 1)]
    item = next(i for i in first[1] if i != 0)  # item 0 is read when the dataset opens
    bad = data / "images" / dataset.image_files[item]
    bad.write_bytes(b"not an image")
    script = tmp_path / "slow_to_end.py"
    script.write_text(_SLOW_TO_END.format(root=ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), *tiny_args(data, tmp_path / "exps", "--max-train-steps", "5", "--num-workers", "0")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "ERW_DEBUG": ""}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode != 0
    root_cause = result.stderr.rsplit("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, result.stderr[-3000:]
    assert f"traceback : error: cannot read image {bad}" in root_cause, result.stderr[-3000:]
    assert "error: lost the connection to another process of the run (RuntimeError" in result.stderr


@pytest.mark.parametrize("command, argv, names", [
    ("sample_ddp.py", ["--ckpt", "{tmp}/none.pt"], "{tmp}/none.pt"),
    ("-m evaluations.evaluator", ["{tmp}/ref.npz", "{tmp}/sample.npz", "--inception-weights", "random"],
     "{tmp}/ref.npz"),
    ("-m evaluations.cknna", ["--ckpt", "{tmp}/none.pt"], "{tmp}/none.pt"),
    ("-m evaluations.demo_metrics", ["{tmp}/ref.npz", "{tmp}/sample.npz"], "{tmp}/ref.npz"),
    ("-m preprocessing.dataset_tools", ["reference", "--data-dir", "{tmp}/nodata", "--out", "{tmp}/r.npz"],
     "{tmp}/nodata"),
    ("-m preprocessing.dataset_tools", ["convert", "--source", "{tmp}/noimages", "--dest", "{tmp}/out"],
     "{tmp}/noimages"),
])
def test_a_missing_input_file_is_one_line_in_every_entry_point(command, argv, names, tmp_path):
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    if command.startswith("-m "):  # a module runs from the repository root (README)
        line = one_line_error(run_entry([*command.split(), *map(fill, argv)], ROOT))
    else:
        line = one_line_error(run_entry([os.path.join(ROOT, command), *map(fill, argv)], tmp_path))
    assert fill(names) in line


def test_only_user_errors_become_one_line_and_a_bugs_value_error_keeps_its_traceback(monkeypatch, capsys):
    """run_main's line is for input the user can fix; a ValueError from our own code is a bug and must surface whole
    (exit 1, the exception itself), not as an `error:` line that blames the user."""
    from operations.cli import FolderTaken, InvalidInput, MissingInput, run_main
    monkeypatch.delenv("ERW_DEBUG", raising=False)

    def raising(error):
        def main(argv):
            raise error
        return main

    for error in (InvalidInput("bad --flag"), MissingInput("no file x"), FolderTaken("run exists")):
        with pytest.raises(SystemExit) as exited:
            run_main(raising(error))
        assert exited.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"
    for bug in (ValueError("shapes of our own tensors differ"), FileNotFoundError("internal"), KeyError("k")):
        with pytest.raises(type(bug)):
            run_main(raising(bug))
        assert "error:" not in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "ERW_DEBUG": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample_ddp.py"), "--ckpt", str(tmp_path / "x.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_log_lines_and_progress_bars_do_not_share_a_line(tmp_path):
    from operations.run import TqdmHandler, setup_logger
    logger = setup_logger(str(tmp_path))
    console = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
    assert len(console) == 1 and isinstance(console[0], TqdmHandler)
    stream = io.StringIO()
    console[0].setStream(stream)
    with tqdm(total=10, file=stream, desc="training", mininterval=0) as bar:
        bar.update(3)
        logger.info("step 3: loss=1")
        bar.update(3)
    # Each line the terminal ends up showing (text after the last carriage return) is either the log line or a bar.
    shown = [line.rsplit("\r", 1)[-1] for line in stream.getvalue().split("\n")]
    logged = [line for line in shown if "step 3: loss=1" in line]
    assert len(logged) == 1 and "training" not in logged[0] and logged[0].endswith("] step 3: loss=1")


def test_the_random_teacher_warning_prints_once_per_run(demo_data, tmp_path, capfd):
    import train_warmup
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "warn", "--max-train-steps", "1"))
    out = capfd.readouterr()
    assert len(re.findall("RANDOM weights", out.out + out.err)) == 1, out.out + out.err
    with open(tmp_path / "warn" / "log.txt") as f:
        assert len(re.findall("RANDOM weights", f.read())) == 1


@pytest.mark.parametrize("module", ["evaluations.evaluator", "preprocessing.dataset_tools", "bench.run"])
def test_a_package_script_started_as_a_path_names_the_module_command(module):
    result = run_entry([os.path.join(ROOT, *module.split(".")) + ".py", "--help"], ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"python -m {module}" in result.stderr


@pytest.mark.parametrize("sample_flag, training_flag, bad, good", [
    ("--num-steps", "--fid-num-steps", "0", "7"),
    ("--mode", "--fid-mode", "heun", "ode"),
    ("--precision", "--fid-precision", "fp16", "bf16"),
    ("--cfg-scale", "--cfg-scale", "0.5", "2.2"),
    ("--guidance-low", "--guidance-low", "-0.1", "0.3"),
    ("--guidance-high", "--guidance-high", "1.5", "0.95"),
])
def test_sample_ddp_and_the_in_training_fid_take_the_same_sampler_values(sample_flag, training_flag, bad, good,
                                                                         capsys):
    """One declaration of the sampler's settings: what sample_ddp.py refuses, a training config refuses too, and a
    value one takes reaches the other's settings as the same number or word."""
    import sample_ddp
    from operations.config import ConfigError, TRAIN, resolve_config
    required = ["--exp-name", "x"]
    with pytest.raises(SystemExit):
        sample_ddp.build_parser().parse_args(["--ckpt", "x.pt", sample_flag, bad])
    assert sample_flag in capsys.readouterr().err
    with pytest.raises(ConfigError, match=training_flag):
        resolve_config(TRAIN, [*required, training_flag, bad])
    sampled = vars(sample_ddp.build_parser().parse_args(["--ckpt", "x.pt", sample_flag, good]))
    trained = resolve_config(TRAIN, [*required, training_flag, good])
    assert sampled[sample_flag[2:].replace("-", "_")] == trained[training_flag[2:].replace("-", "_")] == \
        type(trained[training_flag[2:].replace("-", "_")])(good)
