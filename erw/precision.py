"""Numeric precision: torch's process-wide float32 switches (TF32 or exact IEEE matmuls and convs, set only here),
the sampler's --precision and CPU threads. Training's mixed precision is erw/step.py's.
"""
import contextlib
from typing import Iterator, Optional

import torch


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
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
