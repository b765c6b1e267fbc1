"""Training objectives of both ERW phases: alignment losses (NT-Xent, REPA's cosine), the SiT velocity loss,
the lambda(s) schedule, and `Objective`, which combines them for a phase."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from erw.batch_random import BatchRandom
from erw.transport import Path


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradient of its own rows."""

    @staticmethod
    def forward(ctx, x):
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def gather_rows(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Concatenate (B, ...) tensors of every process along dim 0 in rank order -> (world * B, ...).
    `differentiable=True` keeps gradients: each rank's rows receive the summed gradient of every rank's loss."""
    _, world = _world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x) if differentiable else _all_gather_cat(x)


def ntxent_loss(h: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent per patch position with in-batch negatives from the global batch.

    h: (B, T, D) projector output of this process's images, y: (B, T, D) teacher tokens of the same images.
    For every position p, logits_ij = <h_i,p, y_j,p> / tau over images i (local) and j (global); the positive is
    the same image. Cross-entropy h->y and y->h, averaged over positions and local images. Under DDP the averaged
    gradients equal those of one process holding the whole batch (all processes need the same B).
    """
    if h.shape != y.shape:
        raise ValueError(f"projector output {tuple(h.shape)} and teacher tokens {tuple(y.shape)} differ in shape "
                         "(token count or width): check resolution, patch size and teacher")
    # Logits up to 1/tau = 10 need float32: bf16 would leave them ~0.04 off. Autocast around the training step
    # would turn the einsums into half-precision matmuls, so it is switched off here.
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        h = F.normalize(h.to(dtype), dim=-1)
        y = F.normalize(y.to(dtype), dim=-1)
        rank, _ = _world()
        h_all = gather_rows(h, differentiable=True)
        y_all = gather_rows(y, differentiable=False)
        B, T, _ = h.shape
        logits_hy = torch.einsum("itd,jtd->tij", h, y_all) / temperature    # (T, B, B_global)
        logits_yh = torch.einsum("itd,jtd->tij", y, h_all) / temperature
        target = (torch.arange(B, device=h.device) + rank * B).repeat(T)     # (T * B,), position-major like logits
        loss_hy = F.cross_entropy(logits_hy.reshape(T * B, -1), target)
        loss_yh = F.cross_entropy(logits_yh.reshape(T * B, -1), target)
        return 0.5 * (loss_hy + loss_yh)


def cosine_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """REPA's alignment: negative cosine similarity per token, averaged. h, y: (B, T, D)."""
    if h.shape != y.shape:
        raise ValueError(f"projector output {tuple(h.shape)} and teacher tokens {tuple(y.shape)} differ in shape")
    return -(F.normalize(h.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(dim=-1).mean()


def alignment_loss(kind: str, projections: Sequence[torch.Tensor], teacher_tokens: Sequence[torch.Tensor],
                   temperature: float = 0.1) -> torch.Tensor:
    """Mean over teachers of the `kind` ("ntxent" | "cosine") loss between projections and teacher tokens."""
    if len(projections) != len(teacher_tokens) or not projections:
        raise ValueError(f"{len(projections)} projector outputs for {len(teacher_tokens)} teachers")
    if kind == "ntxent":
        losses = [ntxent_loss(h, y, temperature) for h, y in zip(projections, teacher_tokens)]
    elif kind == "cosine":
        losses = [cosine_loss(h, y) for h, y in zip(projections, teacher_tokens)]
    else:
        raise ValueError(f"unknown alignment loss {kind!r}; choose ntxent or cosine")
    return torch.stack(losses).mean()


def proj_coeff_at(step: int, proj_coeff: float, proj_half_life: float, proj_decay: str) -> float:
    """lambda(s) = proj_coeff * 2^(-s / proj_half_life) (paper eq. 14), or proj_coeff when proj_decay == "none";
    s counts Phase-2 optimizer steps from 0."""
    if proj_decay == "none":
        return proj_coeff
    if proj_decay == "exp":
        return proj_coeff * 2.0 ** (-step / proj_half_life)
    raise ValueError(f"unknown proj_decay {proj_decay!r}; choose exp or none")


def sample_time(n: int, weighting: str, path: Path, device=None, rng: Optional[BatchRandom] = None) -> torch.Tensor:
    """Training times t (n,) in (0, 1): uniform, or lognormal EDM sigmas mapped onto the path
    (sigma = exp(N(0,1)); linear: t = sigma / (1 + sigma); cosine: t = 2/pi * atan(sigma))."""
    rng = rng or BatchRandom()
    if weighting == "uniform":
        return rng.rand((n,), device=device)
    if weighting == "lognormal":
        sigma = rng.randn((n,), device=device).exp()
        if path.name == "linear":
            return sigma / (1 + sigma)
        if path.name == "cosine":
            return 2 / math.pi * torch.atan(sigma)
        raise ValueError(f"lognormal weighting is not defined for path {path.name!r}")
    raise ValueError(f"unknown weighting {weighting!r}; choose uniform or lognormal")


class Objective:
    """The loss of one phase. Phase 1 (`velocity=False`): clean latents at t = 0, alignment only, lambda = 1.
    Phase 2 (`velocity=True`): noisy latents on `path`, velocity MSE + lambda(s) * alignment.

    Every random draw (times, noise, which labels drop to the null class with probability cfg_prob) comes
    from the BatchRandom passed in, so that it does not depend on the number of processes."""

    def __init__(self, velocity: bool, align: Optional[str], ntxent_temp: float = 0.1, path: Optional[Path] = None,
                 weighting: str = "uniform", proj_coeff: float = 1.0, proj_half_life: float = 1.0,
                 proj_decay: str = "none", cfg_prob: float = 0.0):
        if velocity and path is None:
            raise ValueError("the velocity loss needs a path")
        if not velocity and align is None:
            raise ValueError("Phase 1 trains the alignment loss only: an alignment loss is required")
        self.velocity, self.align, self.ntxent_temp = velocity, align, ntxent_temp
        self.path, self.weighting = path, weighting
        self.proj_coeff, self.proj_half_life, self.proj_decay = proj_coeff, proj_half_life, proj_decay
        self.cfg_prob = cfg_prob

    def proj_coeff_at(self, step: int) -> float:
        """lambda(step), the weight of the alignment term; 1 in Phase 1, where it is the whole loss."""
        if not self.velocity:
            return 1.0
        return proj_coeff_at(step, self.proj_coeff, self.proj_half_life, self.proj_decay)

    def __call__(self, model, latents: torch.Tensor, labels: torch.Tensor, teacher_tokens: List[torch.Tensor],
                 step: int, rng: Optional[BatchRandom] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """latents (N, C, H, W), labels (N,), teacher_tokens [(N, T, D)] -> (loss, {name: detached scalar})."""
        rng = rng or BatchRandom()
        n = latents.shape[0]
        logs: Dict[str, torch.Tensor] = {}
        # Label dropout for classifier-free guidance, drawn here rather than inside the model (see class doc).
        drop = (rng.rand((n,), device=labels.device) < self.cfg_prob).long()
        if self.velocity:
            t = sample_time(n, self.weighting, self.path, latents.device, rng)
            noise = rng.randn(latents.shape, device=latents.device, dtype=latents.dtype)
            x_t, target = self.path.interpolate(latents, noise, t)
            pred, projections = model(x_t, t, labels, force_drop_ids=drop,
                                      return_projections=self.align is not None)
            loss = F.mse_loss(pred.float(), target.float())
            logs["velocity_loss"] = loss.detach()
        else:
            _, projections = model(latents, torch.zeros(n, device=latents.device), labels, force_drop_ids=drop)
            loss = latents.new_zeros((), dtype=torch.float32)
        if self.align is not None:
            align = alignment_loss(self.align, projections, teacher_tokens, self.ntxent_temp)
            lambda_used = self.proj_coeff_at(step)
            loss = loss + lambda_used * align
            logs["align_loss"] = align.detach()
            # Logged at step + 1, after the update it weighted.
            logs["lambda_used"] = torch.tensor(lambda_used)
        logs["loss"] = loss.detach()
        return loss, logs
