"""Strict weight imports that say what is wrong (the key and shape checks every loader of this codebase uses), and the
weights' identity (the sha256 a sample folder records)."""
import hashlib
from typing import Dict, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm


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


# sha256 runs at about 1 GB/s: above this many bytes the hash takes long enough to deserve a progress bar.
_HASH_PROGRESS_BYTES = 256 * 2 ** 20


def weights_sha256(state_dict: Dict[str, torch.Tensor], show_progress: bool = False) -> str:
    """sha256 over the tensors in sorted key order: each key's name, dtype, shape and raw bytes. It identifies the
    weights themselves, whatever file, path or checkpoint layout holds them (a sample folder records it)."""
    tensors = [(name, state_dict[name].detach().cpu().contiguous()) for name in sorted(state_dict)]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="Hashing the weights",
              disable=not show_progress or total < _HASH_PROGRESS_BYTES) as bar:
        for name, t in tensors:
            digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
            bar.update(t.numel() * t.element_size())
    return digest.hexdigest()
