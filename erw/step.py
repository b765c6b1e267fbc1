"""One optimizer step of either phase: forward, loss, backward, unscale, clip, optimizer step, EMA.

What is trained arrives as data (the model, an `Objective` of erw/losses.py, the frozen teachers); when to log,
check, save or stop is the loop's business (erw/loop.py). Mixed precision is owned here, the same on CUDA and on the
CPU, where accelerate would turn fp16 into plain fp32:

    no    float32 everywhere
    bf16  torch.autocast(bfloat16) around the forward passes; float32 weights, gradients and optimizer state
    fp16  torch.autocast(float16) and a GradScaler: the loss is scaled before backward, gradients are unscaled
          before clipping, and a step whose gradients overflow is skipped while the scale is halved
"""
import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from erw.batch_random import BatchRandom, derive_seed
from erw.data import sample_latents
from erw.losses import Objective

AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """--mixed-precision on `device`: `autocast()` for forward passes, `scaler` for fp16's loss scaling (a disabled
    GradScaler otherwise, whose scale and unscale are identities)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in AUTOCAST_DTYPES:
            raise ValueError(f"--mixed-precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {mode!r}")
        self.mode, self.device_type, self.dtype = mode, device.type, AUTOCAST_DTYPES[mode]
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
        if state and self.scaler.is_enabled():  # a checkpoint of another precision has no scale to restore
            self.scaler.load_state_dict(state)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (pos_embed is constant in both)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, applied: torch.Tensor) -> None:
    """One AdamW step, or none where `applied` is False, decided on the device: fused AdamW skips its update (and its
    step count) when `found_inf` is set, which is how GradScaler skips fp16 overflows without a host sync."""
    if scaler.is_enabled():
        scaler.step(optimizer)  # found_inf from its own unscale_: the same non-finite gradients
        scaler.update()
        return
    optimizer.grad_scale, optimizer.found_inf = None, (~applied).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def train_step(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
               precision: MixedPrecision, objective: Objective, teachers: Sequence[torch.nn.Module],
               micro_batches: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], step: int, seed: int,
               max_grad_norm: float, ema_decay: float, rank: int = 0, world_size: int = 1
               ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimizer step `step` (0-based) on this process's micro-batches [(images or cached tokens, moments (N, 8, h,
    w), labels (N,))], on the device. Returns, on the device: the logged values (means over the micro-batches),
    whether every loss was finite, the gradient norm (before clipping) and whether the update was applied (it is
    skipped when the gradients are not finite). `model` may be DDP-wrapped; `ema` is the plain module."""
    plain = getattr(model, "module", model)
    logs: Dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=plain.pos_embed.device)
    for i, (images, moments, labels) in enumerate(micro_batches):
        # The same seed on every process and micro-batch of the step: each draws the step's whole global batch and
        # keeps its own rows (erw/batch_random.py), so the result does not depend on how the batch is split.
        torch.manual_seed(derive_seed(seed, step))
        rng = BatchRandom(rank, world_size, i, len(micro_batches))
        latents = sample_latents(moments, rng=rng)
        with torch.no_grad(), precision.autocast():
            teacher_tokens = [teacher(images) for teacher in teachers]
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or plain is model else model.no_sync():  # all-reduce on the last only
            with precision.autocast():
                loss, micro_logs = objective(model, latents, labels, teacher_tokens, step, rng)
            precision.scaler.scale(loss / len(micro_batches)).backward()
        logs = {k: logs.get(k, 0) + v / len(micro_batches) for k, v in micro_logs.items()}
        finite &= torch.isfinite(loss.detach())
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))  # 0: no clipping
    applied = torch.isfinite(grad_norm)
    apply_update(optimizer, precision.scaler, applied)
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, plain, ema_decay)
    return logs, finite, grad_norm, applied
