"""tests/test_gpu.py without a GPU: its code runs end to end on the CPU at toy sizes (ERW_GPU_REHEARSE=1), and its
resume check tells GPU noise from a lost state."""
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT


def test_the_gpu_tests_run_on_the_cpu_at_toy_sizes(tmp_path):
    """`python -m pytest -m gpu tests/test_gpu.py` rehearsed (the evaluator's stub network keeps its FIDs short):
    every test runs its code and passes; none is skipped."""
    proc = subprocess.run([sys.executable, "-m", "tests.stub_inception", "-m", "pytest", "-m", "gpu", "-q", "-rs",
                           "-p", "no:cacheprovider", f"--basetemp={tmp_path}", "tests/test_gpu.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "ERW_GPU_REHEARSE": "1"})
    assert proc.returncode == 0 and "skipped" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _trajectory_checkpoints(seed=0, params=4000, m=20):
    """Checkpoints of a fake N + M run on a noisy GPU: weights at N, M updates of ~equal size, two straight runs
    that differ by run-to-run noise (2 % of the last M steps' movement)."""
    g = torch.Generator().manual_seed(seed)
    w_n = torch.randn(params, generator=g, dtype=torch.float64)
    updates = [1e-2 * torch.randn(params, generator=g, dtype=torch.float64) for _ in range(m)]
    moved = float(sum(updates).norm())

    def noise():
        return 0.02 * moved / params ** 0.5 * torch.randn(params, generator=g, dtype=torch.float64)

    def ckpt(weights, skipped):
        return {"model": {"w": weights}, "ema": {"w": weights}, "opt": {}, "scaler": {}, "skipped_steps": skipped}

    straight = ckpt(w_n + sum(updates), 0)
    straight2 = ckpt(w_n + sum(updates) + noise(), 0)
    return w_n, updates, straight, straight2, ckpt, noise


def test_resume_check_allows_a_gradscaler_skip_and_catches_a_lost_state():
    """tests/test_gpu.py's resume check on a noisy GPU: a resumed run whose fp16 GradScaler skipped one update more
    than the straight run (its weights one update behind) is fine; one that lost its state is not."""
    from tests.test_gpu import resume_disagreement
    m = 20
    w_n, updates, straight, straight2, ckpt, noise = _trajectory_checkpoints(m=m)
    at_n, before_last = {"w": w_n}, {"w": w_n + sum(updates[:-1])}
    one_more_skip = ckpt(w_n + sum(updates[1:]) + noise(), 1)
    assert resume_disagreement(straight, straight2, one_more_skip, at_n, before_last) is None
    # The same weights reported without the skip: one update off is too much for run-to-run noise alone.
    assert "resumed run off by" in resume_disagreement(straight, straight2, {**one_more_skip, "skipped_steps": 0},
                                                       at_n, before_last)
    g = torch.Generator().manual_seed(1)  # optimizer moments lost: the M updates go elsewhere
    lost = ckpt(w_n + sum(1e-2 * torch.randn(w_n.shape, generator=g, dtype=torch.float64) for _ in range(m)), 0)
    assert "resumed run off by" in resume_disagreement(straight, straight2, lost, at_n, before_last)
    # A deterministic GPU: bit for bit, or named.
    assert resume_disagreement(straight, straight, straight, at_n, before_last) is None
    assert "the resumed model, ema differ" in resume_disagreement(straight, straight, straight2, at_n, before_last)


