"""Mixed precision for training, owned here rather than by accelerate: autocast for the SiT and the teacher, and
fp16's loss scaling, the same on CUDA and on the CPU.

accelerate turns --mixed-precision fp16 into plain fp32 on the CPU (no autocast, no GradScaler), so the paper's
setting could not be tested there; torch's autocast and GradScaler both run on the CPU, and the loop uses them on
every device:

    no    float32 everywhere
    bf16  torch.autocast(bfloat16) around the forward passes; float32 weights, gradients and optimizer state
    fp16  torch.autocast(float16) and a GradScaler: the loss is scaled before backward, gradients are unscaled
          before clipping, and a step whose gradients overflow is skipped while the scale is halved
"""
from typing import Any, Dict, Optional

import torch

AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The --mixed-precision policy on `device`: `autocast()` for forward passes, `scaler` for fp16's loss scaling
    (a disabled GradScaler otherwise, whose scale/unscale are identities)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in AUTOCAST_DTYPES:
            raise ValueError(f"--mixed-precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {mode!r}")
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
