"""Checkpoint files: atomic writes, safe loads, and strict weight imports that say what is wrong."""
import os
import tempfile
from typing import IO, Callable, Mapping

import torch
import torch.nn as nn


def atomic_write(path: str, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Call write_fn on a binary temp file beside `path`, then rename it over `path`: a crash leaves the old file
    or the new one, never half of one. Temp names are `.<name>.<random>.tmp`, which no reader of ours picks up
    and preprocessing's resume cleans away."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state: dict, path: str) -> None:
    """torch.save `state` to `path` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint on the CPU with weights_only=True (plain dicts, tensors and numbers only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise if the key sets or any shape differ, listing the offending keys."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
                  for k in sorted(set(expected) & set(given)) if expected[k].shape != given[k].shape]
    if missing or unexpected or mismatched:
        def _fmt(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt(mismatched)}")
        raise ValueError("\n".join(lines))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(strict=True), with an error naming `what` and every wrong key/shape."""
    check_state_dict(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True)
