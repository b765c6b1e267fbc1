"""Random draws of a training micro-batch that do not depend on how many processes share the global batch, nor on
how many accumulation steps it is split into.

The data sampler deals the data stream round-robin: local row i of process r in micro-batch a of an optimizer step
is row (a * B + i) * world + r of that step's global batch (B rows per process and micro-batch), the same image that
a run with one micro-batch of A * B rows per process, or one process, puts at that row. Every process draws the rows
of the step's whole global batch, from the same seed, and keeps its own. A run on 8 GPUs with accumulation 2 then
draws the same noise, times and label drops for every image as a run on one GPU with the same global batch in one
micro-batch, and the two train the same model up to floating-point summation order (the velocity and cosine
losses are means over images; NT-Xent's negatives are the images of one micro-batch, so accumulation changes that
loss, as it does in every contrastive codebase). Drawing world x A times more numbers than needed costs microseconds
next to a training step.
"""
from typing import Sequence

import numpy as np
import torch


class BatchRandom:
    """Draws for this process's rows of micro-batch `accumulation_index` of a global batch (rank `rank` of
    `world_size`, `accumulation_steps` micro-batches per optimizer step), from torch's default generator, which
    the loop reseeds identically on every process and every micro-batch of a step."""

    def __init__(self, rank: int = 0, world_size: int = 1, accumulation_index: int = 0,
                 accumulation_steps: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if not 0 <= accumulation_index < accumulation_steps:
            raise ValueError(f"accumulation index {accumulation_index} is not in 0..{accumulation_steps - 1}")
        self.rank, self.world_size = rank, world_size
        self.accumulation_index, self.accumulation_steps = accumulation_index, accumulation_steps

    def _own_rows(self, draw, shape: Sequence[int]) -> torch.Tensor:
        per_micro_batch = shape[0] * self.world_size
        if self.world_size == 1 and self.accumulation_steps == 1:
            return draw(tuple(shape))
        full = draw((per_micro_batch * self.accumulation_steps, *shape[1:]))
        start = self.accumulation_index * per_micro_batch
        return full[start:start + per_micro_batch][self.rank::self.world_size]

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        """Standard normals of the local `shape` (rows first)."""
        return self._own_rows(lambda s: torch.randn(s, device=device, dtype=dtype), shape)

    def rand(self, shape: Sequence[int], device=None) -> torch.Tensor:
        """Uniforms in [0, 1) of the local `shape` (rows first)."""
        return self._own_rows(lambda s: torch.rand(s, device=device), shape)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, rank, index, ...), stable across Python runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2 ** 31], dtype=np.uint64)))
