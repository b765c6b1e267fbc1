"""Random draws of a training micro-batch that do not depend on how many processes share the global batch.

The data sampler deals each global micro-batch round-robin: local row i of process r is row i * world + r of the
global micro-batch. Every process draws the rows of the whole global micro-batch, from the same seed, and keeps its
own (rows r::world). A run on 8 GPUs then draws the same noise, times and label drops for every image as a run on
one GPU with the same global batch, and the two train the same model up to floating-point summation order.
Drawing world x more numbers than needed costs microseconds next to a training step.
"""
from typing import Sequence

import torch


class BatchRandom:
    """Draws for this process's rows of a global micro-batch (rank `rank` of `world_size`), from torch's default
    generator, which the loop reseeds identically on every process for each micro-batch."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size

    def _own_rows(self, draw, shape: Sequence[int]) -> torch.Tensor:
        full = draw((shape[0] * self.world_size, *shape[1:]))
        return full[self.rank::self.world_size] if self.world_size > 1 else full

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        """Standard normals of the local `shape` (rows first)."""
        return self._own_rows(lambda s: torch.randn(s, device=device, dtype=dtype), shape)

    def rand(self, shape: Sequence[int], device=None) -> torch.Tensor:
        """Uniforms in [0, 1) of the local `shape` (rows first)."""
        return self._own_rows(lambda s: torch.rand(s, device=device), shape)
