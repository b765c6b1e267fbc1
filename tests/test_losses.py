"""Alignment losses, the lambda schedule and time sampling against direct references and closed forms."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from erw.losses import Objective, align_weight, alignment_loss, cosine_loss, ntxent_loss, sample_time
from erw.transport import get_path
from tests.dist_utils import run_distributed


def ntxent_reference(h, y, tau):
    """NT-Xent written from its definition with loops: per position p, image i's positive is j = i."""
    h = h / np.linalg.norm(h, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    B, T, _ = h.shape
    total = 0.0
    for p in range(T):
        for i in range(B):
            for a, b in ((h, y), (y, h)):
                logits = [float(a[i, p] @ b[j, p]) / tau for j in range(B)]
                log_z = math.log(sum(math.exp(l) for l in logits))
                total += 0.5 * (log_z - logits[i])
    return total / (B * T)


def test_ntxent_matches_direct_reference():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(5, 3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    for tau in (0.1, 0.5):
        ours = ntxent_loss(h, y, tau).item()
        assert ours == pytest.approx(ntxent_reference(h.numpy(), y.numpy(), tau), rel=1e-5)


def test_ntxent_aligned_and_separated_is_near_zero():
    B, T, D = 8, 4, 16
    y = torch.eye(D)[:B].unsqueeze(1).repeat(1, T, 1)              # orthogonal across images
    loss = ntxent_loss(y.clone(), y, temperature=0.1).item()
    assert loss == pytest.approx(math.log(1 + (B - 1) * math.exp(-10)), rel=1e-4)
    assert loss < 1e-3


def test_ntxent_identical_tokens_across_images_is_log_b():
    B = 6
    h = torch.randn(1, 4, 8).repeat(B, 1, 1)
    y = torch.randn(1, 4, 8).repeat(B, 1, 1)
    assert ntxent_loss(h, y, 0.1).item() == pytest.approx(math.log(B), rel=1e-6)


def test_ntxent_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="token count"):
        ntxent_loss(torch.randn(2, 16, 8), torch.randn(2, 256, 8), 0.1)


def test_cosine_loss_is_negative_mean_cosine():
    g = torch.Generator().manual_seed(1)
    h, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    hn, yn = h.numpy(), y.numpy()
    cos = (hn * yn).sum(-1) / (np.linalg.norm(hn, axis=-1) * np.linalg.norm(yn, axis=-1))
    assert cosine_loss(h, y).item() == pytest.approx(-cos.mean(), rel=1e-5)
    assert alignment_loss("cosine", [h, h], [y, y]).item() == pytest.approx(-cos.mean(), rel=1e-5)


def _ntxent_two_process_worker(rank, world_size, x, w, y, out_dir):
    B = x.shape[0] // world_size
    weight = w.clone().requires_grad_(True)
    h = x[rank * B:(rank + 1) * B] @ weight                       # a linear "projector" shared by both ranks
    loss = ntxent_loss(h, y[rank * B:(rank + 1) * B], 0.1)
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world_size                                              # what DDP does to parameter gradients
    loss_mean = loss.detach().clone()
    dist.all_reduce(loss_mean)
    loss_mean /= world_size
    if rank == 0:
        torch.save({"loss": loss_mean, "grad": grad}, os.path.join(out_dir, "result.pt"))


def test_ntxent_two_processes_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, 4, 5, generator=g, dtype=torch.float64)
    weight = w.clone().requires_grad_(True)
    loss = ntxent_loss(x @ weight, y, 0.1)
    loss.backward()
    run_distributed(_ntxent_two_process_worker, 2, x, w, y, str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result["grad"], weight.grad, rtol=1e-10, atol=1e-12)


def test_lambda_schedule_halves_every_half_life():
    assert align_weight(0, 0.5, 1000, "exp") == pytest.approx(0.5)
    assert align_weight(1000, 0.5, 1000, "exp") == pytest.approx(0.25)
    assert align_weight(2000, 0.5, 1000, "exp") == pytest.approx(0.125)
    assert align_weight(500, 0.5, 1000, "exp") == pytest.approx(0.5 / math.sqrt(2))
    assert all(align_weight(s, 0.5, 1000, "none") == 0.5 for s in (0, 1000, 10 ** 6))


@pytest.mark.parametrize("path_type,t_of_sigma", [
    ("linear", lambda s: s / (1 + s)), ("cosine", lambda s: 2 / math.pi * math.atan(s))])
def test_lognormal_times_follow_the_edm_mapping(path_type, t_of_sigma):
    torch.manual_seed(0)
    t = sample_time(40000, "lognormal", get_path(path_type)).numpy()
    # sigma = exp(N(0,1)): its 16%, 50% and 84% quantiles are e^-1, 1, e^1; t is monotone in sigma.
    for q, z in ((0.1587, -1.0), (0.5, 0.0), (0.8413, 1.0)):
        assert np.quantile(t, q) == pytest.approx(t_of_sigma(math.exp(z)), abs=0.01)
    u = sample_time(40000, "uniform", get_path(path_type)).numpy()
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


class RecordingModel(torch.nn.Module):
    """Returns fixed outputs and records its inputs: isolates Objective's arithmetic."""

    def __init__(self, velocity, projection):
        super().__init__()
        self.velocity, self.projection, self.calls = velocity, projection, []

    def forward(self, x, t, y, return_projections=True):
        self.calls.append((x, t, y, return_projections))
        return self.velocity, [self.projection] if return_projections else []


def test_phase1_objective_uses_clean_latents_at_t0_and_alignment_only():
    latents, labels = torch.randn(4, 4, 2, 2), torch.arange(4)
    proj, teacher = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    model = RecordingModel(None, proj)
    loss, logs = Objective(velocity=False, align="ntxent", ntxent_temp=0.2)(model, latents, labels, [teacher], 7)
    x, t, y, _ = model.calls[0]
    assert torch.equal(x, latents) and torch.equal(t, torch.zeros(4)) and torch.equal(y, labels)
    assert loss.item() == pytest.approx(ntxent_loss(proj, teacher, 0.2).item())
    assert "velocity_loss" not in logs


def test_phase2_objective_is_velocity_plus_decayed_alignment():
    torch.manual_seed(0)
    latents, labels = torch.randn(4, 4, 2, 2), torch.arange(4)
    proj, teacher = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    path = get_path("linear")
    model = RecordingModel(torch.zeros(4, 4, 2, 2), proj)
    objective = Objective(velocity=True, align="cosine", path=path, proj_coeff=0.5, proj_half_life=10,
                          proj_decay="exp")
    torch.manual_seed(3)
    loss, logs = objective(model, latents, labels, [teacher], step=10)
    x_t, t, _, _ = model.calls[0]
    torch.manual_seed(3)                                             # replay the same draws
    t_ref = torch.rand(4)
    noise = torch.randn_like(latents)
    tt = t_ref.view(-1, 1, 1, 1)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(x_t, (1 - tt) * latents + tt * noise)
    velocity_mse = ((noise - latents) ** 2).mean()                 # model predicts 0; target = eps - x
    expected = velocity_mse + 0.25 * cosine_loss(proj, teacher)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["lambda"].item() == pytest.approx(0.25)
