"""What every command-line entry point shares: help that shows defaults, hints for REPA's, DiT's and SiT's flag names,
the user-input error kinds, and run_main, which prints such an error as one line with exit status 2 (ERW_DEBUG=1
keeps the traceback)."""
import argparse
import json
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

from operations.files import temp_path_for
from operations.preemption import report_exit_status

# Flags of the codebases our users come from -> what to type here.
FLAG_HINTS = {
    "--resume-step": "--resume (continues from the newest intact checkpoint of --exp-name)",
    "--num-sampling-steps": "--num-steps",
    "--sampling-steps": "--sample-grid-every (how often training saves a sample grid)",
    "--sampling-steps-sde": "--num-steps",
    "--image-size": "--resolution (in pixels)",
    "--tf32": "--allow-tf32 (training) or --precision tf32 (sample_ddp.py)",
    "--sampling-method": "--mode sde|ode, and --heun for Heun's ODE solver",
    "--cfg": "--cfg-scale",
    "--steps": "--num-steps (sampling) or --max-train-steps (training)",
    "--epochs": "--max-train-steps (optimizer steps, not epochs)",
    "--global-batch-size": "--batch-size (the global batch, over all processes)",
    "--results-dir": "--output-dir",
    "--ckpt-every": "--checkpointing-steps",
    "--vae-path": "--vae",
    "--fid-samples": "--num-fid-samples",
}
# SiT's sample_ddp.py takes the sampler as a positional word.
WORD_HINTS = {"SDE": "--mode sde", "ODE": "--mode ode"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and ends every option's help with its default (where it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "(default" in text or not action.option_strings
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter and, for an unknown flag that another codebase uses, a hint naming ours."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        # No prefixes of long flags: "--cfg" must not quietly become "--cfg-scale" in one script and an error in
        # another, and a flag added later must not change what an old command line means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        hints = []
        for flag, ours in FLAG_HINTS.items():
            if re.search(rf"(^|\s){re.escape(flag)}(=|\s|$)", message):
                hints.append(f"{flag} is not a flag here; use {ours}")
        for word, ours in WORD_HINTS.items():
            if re.search(rf"(^|\s){word}(\s|$)", message):
                hints.append(f"'{word}' is SiT's way to choose the sampler; here use {ours}")
        if hints:
            message += "\n  hint: " + "\n  hint: ".join(hints)
        super().error(message)


class UserError(Exception):
    """Input that cannot be used (a flag, a config key, a file, a folder); the message says which and how to
    proceed. Each kind is also the built-in error it refines, so `except ValueError` keeps working around it."""


class InvalidInput(UserError, ValueError):
    """A value that cannot be used: a flag, a file's contents, a checkpoint or folder that does not fit the run."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or the run needs) is not there."""


class FolderTaken(UserError, FileExistsError):
    """The folder already holds a run (or a live run holds it)."""


def check_folder_path(path: str, flag: str) -> None:
    """Refuse a folder to be made or used at `path` when it, or a folder above it, is a file (os.makedirs would end
    in a NotADirectoryError traceback), naming the flag. Entry points call it before they write anything."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InvalidInput(f"{flag} {path}: {existing} is a file, not a folder")


def within(value: float, bounds: str) -> bool:
    """Whether `value` lies in `bounds`, interval notation: "[0, 1)" is 0 <= x < 1, "(0, inf)" is x > 0."""
    match = re.fullmatch(r"([\[(])\s*([-+0-9.e]+|-inf)\s*,\s*([-+0-9.e]+|inf)\s*([\])])", bounds)
    if match is None:
        raise ValueError(f"bounds must look like [0, 1) or (0, inf), got {bounds!r}")
    low, high = float(match[2]), float(match[3])
    return (low < value or (match[1] == "[" and value == low)) and (value < high or (match[4] == "]" and value == high))


def number(bounds: str, kind: type = int):
    """A value of `kind` (int or float) in `bounds`, interval notation: "[1, inf)", "(0, 1]"."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not within(value, bounds):  # nan is in no interval
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return convert


def writable(folder: bool = False):
    """An argparse `type`: a path that check_writable accepts."""
    def convert(text: str) -> str:
        try:
            check_writable(text, "", folder=folder)
        except InvalidInput as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    return convert


def check_writable(path: str, flag: str, folder: bool = False, hint: str = "choose another path") -> None:
    """Raise InvalidInput naming `flag` and `path` unless the file `path` (with `folder`, the folder) can be written
    later: its nearest existing ancestor must be a folder in which a probe file, in atomic_write's temp-name pattern,
    can be created (and is removed at once)."""
    named = f"{flag} {path}".lstrip()
    target = os.path.abspath(path)
    if not folder and os.path.isdir(target):
        raise InvalidInput(f"{named} is a folder, not a file; {hint}")
    existing = target if folder else os.path.dirname(target)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InvalidInput(f"{named} cannot be written: {existing} is not a folder; {hint}")
    # A real write, not os.access: permission bits say yes to root where e.g. a root-squashed NFS mount says no.
    probe = temp_path_for(os.path.join(existing, os.path.basename(target)))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as error:
        raise InvalidInput(f"{named} cannot be written: creating a file in {existing} failed "
                           f"({error.strerror or error}); {hint}") from None


@contextmanager
def refusals(what: Optional[str] = None):
    """Around the one call that hands models/ or erw/ a user's setting or file, turn their plain ValueError /
    FileNotFoundError into UserError kinds, prefixed with `what` (the flag or file) unless the message names it.
    Keep the wrapped call narrow: inside it, a bug's ValueError would read as the user's."""
    try:
        yield
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as e:
        message = user_message(e)
        if what and what not in message:
            message = f"{what}: {message}"
        raise (MissingInput if isinstance(e, FileNotFoundError) else InvalidInput)(message) from e


def user_message(error: BaseException) -> str:
    """The message of a user-input error; for one re-raised from a DataLoader worker (torch's "Caught X in DataLoader
    worker process N." and the worker's traceback), the traceback's last line(s)."""
    text = str(error)
    module = type(error).__module__
    prefix = f"\n{'' if module == 'builtins' else module + '.'}{type(error).__qualname__}: "
    if text.startswith(f"Caught {type(error).__name__} ") and prefix in text:
        text = text[text.rindex(prefix) + len(prefix):].rstrip("\n")
    return text


# Set by torchrun's elastic agent (also under accelerate launch on several GPUs); its summary, the last thing a user
# sees, names as "Root Cause" the earliest failure among the processes that had ended when it noticed the first.
ELASTIC_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
# What gloo says in the other processes when one of them ends: their error is not the cause.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")
PEER_LOST_WAIT_S = 60.0  # how long such a process waits to be stopped by the agent (longer: a peer on another node)


def _record_for_the_launcher(line: str) -> None:
    """Leave the one line in the agent's error file (the format its ErrorHandler writes), so that the summary's root
    cause shows it instead of a link to the docs."""
    path = os.environ.get(ELASTIC_ERROR_FILE_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)


def _wait_to_be_stopped(error: BaseException) -> None:
    """Another process of the run ended (its own error says why): stay alive until the agent stops this one, so
    that its summary names that process as the root cause, not this one's lost connection."""
    print(f"error: lost the connection to another process of the run ({type(error).__name__}: {error}); the "
          "error of the process that ended first is the cause", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's SIGTERM ends this process at once
    time.sleep(PEER_LOST_WAIT_S)


def run_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> None:
    """Run an entry point's main(argv); a user-input error becomes one line on stderr and exit status 2, an error
    that carries its own `exit_code` (a checkpoint that could not be written: 74) one line and that status. The
    status is reported to launch.py (operations/preemption.py), the line to torchrun's summary."""
    code = 1  # an uncaught exception
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:  # preemption (75), argparse (2), --help (0)
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    except Exception as error:
        error_code = getattr(error, "exit_code", None)
        if (error_code is None and not isinstance(error, UserError)) or os.environ.get("ERW_DEBUG"):
            if os.environ.get(ELASTIC_ERROR_FILE_ENV) and any(text in str(error) for text in PEER_LOST):
                _wait_to_be_stopped(error)
            raise
        line = f"error: {user_message(error)}"
        print(line, file=sys.stderr)
        _record_for_the_launcher(line)
        code = error_code or 2
    finally:
        report_exit_status(code)
    if code:
        sys.exit(code)
