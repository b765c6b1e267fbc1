"""Counts, sizes and output paths checked where they enter: argparse types, whose error names the flag
(`argument --shard-items: must be in [1, inf), got 0`) before anything is read or written, and the writable-path
check behind them."""
import argparse
import os

from erw.cli import InvalidInput
from erw.config import within
from erw.files import temp_path_for


def number(bounds: str, kind: type = int):
    """A value of `kind` (int or float) in `bounds`, interval notation as erw/config.py's: "[1, inf)", "(0, 1]"."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not within(value, bounds):  # nan is in no interval
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def writable(folder: bool = False):
    """A path that can be written: a file (or, with `folder`, a folder) that is not something else (erw/files.py
    check_writable)."""
    def convert(text: str) -> str:
        try:
            check_writable(text, "", folder=folder)
        except InvalidInput as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    convert.__name__ = "folder" if folder else "file"
    return convert


def check_writable(path: str, flag: str, folder: bool = False, hint: str = "choose another path") -> None:
    """Raise InvalidInput naming `flag` and `path` unless the file `path` (with `folder`, the folder) can be written
    later: its nearest existing ancestor must be a folder in which a probe file, in atomic_write's temp-name
    pattern, can be created (and is removed at once). Creates nothing; missing folders are made when writing. An
    empty `flag` starts the message with the path (argparse names the flag itself)."""
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
