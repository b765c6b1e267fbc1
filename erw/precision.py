"""Numeric precision, in one place: torch's process-wide float32 switches (TF32 or exact IEEE matmuls and convs,
set only here), the sampler's --precision, CPU threads, and mixed precision for training.

Training's mixed precision is owned here rather than by accelerate: autocast for the SiT and the teacher, and fp16's
loss scaling, the same on CUDA and on the CPU.

accelerate turns --mixed-precision fp16 into plain fp32 on the CPU (no autocast, no GradScaler), so the paper's
setting could not be tested there; torch's autocast and GradScaler both run on the CPU, and the loop uses them on
every device:

    no    float32 everywhere
    bf16  torch.autocast(bfloat16) around the forward passes; float32 weights, gradients and optimizer state
    fp16  torch.autocast(float16) and a GradScaler: the loss is scaled before backward, gradients are unscaled
          before clipping, and a step whose gradients overflow is skipped while the scale is halved
"""
import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

from erw.cli import InvalidInput

AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The --mixed-precision policy on `device`: `autocast()` for forward passes, `scaler` for fp16's loss scaling
    (a disabled GradScaler otherwise, whose scale/unscale are identities)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in AUTOCAST_DTYPES:
            raise InvalidInput(f"--mixed-precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {mode!r}")
        self.mode, self.device_type = mode, device.type
        self.dtype = AUTOCAST_DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def describe(self) -> str:
        if self.dtype is None:
            return f"float32 on {self.device_type} (no autocast)"
        scaling = ", GradScaler loss scaling" if self.scaler.is_enabled() else ""
        return f"{self.mode} autocast on {self.device_type} (SiT and teacher forward{scaling}); float32 weights"

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore the loss scale; a checkpoint from another precision has none (or one this run does not use)."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


# torch has two APIs for these switches (allow_tf32 and fp32_precision) and refuses to read one that both have set:
# this codebase uses fp32_precision only, through these two functions.
def set_fp32_precision(mode: str) -> None:
    """Float32 matmuls and convolutions, process-wide: "ieee" exact, "tf32" TensorFloat-32 on Ampere and newer."""
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


@contextlib.contextmanager
def fp32_switches_restored() -> Iterator[None]:
    """Whatever the block sets, the float32 switches are as before after it."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@contextlib.contextmanager
def fp32_precision_scope(mode: str) -> Iterator[None]:
    """set_fp32_precision(mode) inside the block, the previous switches restored after it."""
    with fp32_switches_restored():
        set_fp32_precision(mode)
        yield


PRECISIONS = ("fp32", "tf32", "bf16")  # the sampler's --precision


def apply_precision(precision: str) -> Optional[torch.dtype]:
    """fp32: exact float32 matmuls and convs; tf32: TF32 matmuls/convs on Ampere+; bf16: the SiT under bf16
    autocast (the VAE stays float32 with TF32). Sets the process-wide switches; returns the autocast dtype for
    GuidedVelocity."""
    if precision not in PRECISIONS:
        raise InvalidInput(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    set_fp32_precision("ieee" if precision == "fp32" else "tf32")
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[Optional[torch.dtype]]:
    """apply_precision inside the block, torch's switches restored after it: for sampling inside a process that
    goes on (the in-training FID, tests, benchmarks). Yields the autocast dtype."""
    with fp32_switches_restored():
        yield apply_precision(precision)


@contextlib.contextmanager
def cpu_threads(num_threads: int) -> Iterator[None]:
    """Run the block with torch using num_threads CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
