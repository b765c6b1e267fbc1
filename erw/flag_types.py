"""argparse types that check a count, a size or an output path where it enters: argparse's error then names the flag
(`argument --shard-items: must be in [1, inf), got 0`), and nothing has been read or written yet."""
import argparse

from erw.cli import InvalidInput
from erw.config import within
from erw.files import check_writable


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
