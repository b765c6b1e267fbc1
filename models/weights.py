"""Strict weight imports that say what is wrong: the key and shape checks every loader of this codebase uses."""
from typing import Mapping

import torch
import torch.nn as nn


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
