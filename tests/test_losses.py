"""Alignment losses, the lambda schedule and time sampling against direct references and closed forms."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from erw.batch_random import BatchRandom
from erw.losses import Objective, proj_coeff_at, alignment_loss, cosine_loss, ntxent_loss, sample_time
from erw.transport import get_path
from tests.dist_utils import run_distributed

# Tolerances below follow from the dtype: float32 eps = 1.19e-7, float64 eps = 2.2e-16 (relative rounding of one
# operation), times the magnitudes involved and the number of roundings. float32 results may differ in their last
# bits from one CPU to another (vector width, BLAS kernels, summation order), so no float32 bound relies on luck.
EPS32 = torch.finfo(torch.float32).eps


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
                log_z = math.log(sum(math.exp(logit) for logit in logits))
                total += 0.5 * (log_z - logits[i])
    return total / (B * T)


def test_ntxent_matches_direct_reference():
    g = torch.Generator().manual_seed(0)
    h, y = (torch.randn(5, 3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    for tau in (0.1, 0.5):
        ours = ntxent_loss(h, y, tau).item()
        # float64 on both sides: logits |l| <= 1/tau = 10, a log-sum-exp over 5 of them, loss ~5, so each side is
        # within a few ulp(10) ~ 1e-14 of the exact value; rel=1e-10 leaves room and catches any wrong term.
        assert ours == pytest.approx(ntxent_reference(h.numpy(), y.numpy(), tau), rel=1e-10)


def test_ntxent_aligned_and_separated_is_near_zero():
    B, T, D = 8, 4, 16
    y = torch.eye(D)[:B].unsqueeze(1).repeat(1, T, 1)              # orthogonal across images
    expected = math.log(1 + (B - 1) * math.exp(-10))               # 3.2e-4
    # The loss is a log-sum-exp (~10.0003) minus the positive logit (10): a cancellation that keeps about
    # ulp(lse) absolute error. In float64 that is ~2e-15, i.e. ~1e-11 relative: rel=1e-9.
    loss64 = ntxent_loss(y.double(), y.double(), temperature=0.1).item()
    assert loss64 == pytest.approx(expected, rel=1e-9)
    # In float32 (training's dtype) ulp(10) = 9.5e-7, i.e. ~3e-3 relative, and where in it the result lands depends
    # on the CPU's kernels (an AMD EPYC gave 3.1782e-4 against 3.1775e-4 here). Bound: half an ulp of the lse
    # (4.8e-7) and of the sum 1 + 7 e^-10 (6e-8) plus the exp/log roundings, < 1e-6; abs=2e-6 (0.6 %) still fails
    # on a wrong temperature or a missing factor (x2, x0.5).
    loss = ntxent_loss(y.clone(), y, temperature=0.1).item()
    assert loss == pytest.approx(expected, abs=2e-6)
    assert loss < 1e-3


def test_ntxent_identical_tokens_across_images_is_log_b():
    B = 6
    h = torch.randn(1, 4, 8, dtype=torch.float64).repeat(B, 1, 1)
    y = torch.randn(1, 4, 8, dtype=torch.float64).repeat(B, 1, 1)
    # float64: logits |l| <= 10 are equal within each row, log-sum-exp - l = log 6 with ~ulp(10) ~ 2e-15 error
    # (float32 would leave ulp(10) = 9.5e-7, i.e. 5e-7 relative, too close to a 1e-6 bound).
    assert ntxent_loss(h, y, 0.1).item() == pytest.approx(math.log(B), rel=1e-12)


def test_ntxent_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="token count"):
        ntxent_loss(torch.randn(2, 16, 8), torch.randn(2, 256, 8), 0.1)


def test_cosine_loss_is_negative_mean_cosine():
    g = torch.Generator().manual_seed(1)
    h, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    hn, yn = h.numpy().astype(np.float64), y.numpy().astype(np.float64)   # the reference in float64
    cos = (hn * yn).sum(-1) / (np.linalg.norm(hn, axis=-1) * np.linalg.norm(yn, axis=-1))
    # cosine_loss runs in float32: each cosine (two norms and a dot of D = 4 terms, two divisions) is within
    # ~(D + 6) eps of the exact one, |cos| <= 1, and the mean of 15 adds <= 15 eps: 25 eps = 3e-6 absolute. The
    # mean cosine is 0.097 here, so a relative bound would rest on that value: abs = 50 eps = 6e-6 still catches a
    # flipped sign or a sum instead of a mean.
    assert cosine_loss(h, y).item() == pytest.approx(-cos.mean(), abs=50 * EPS32)
    assert alignment_loss("cosine", [h, h], [y, y]).item() == pytest.approx(-cos.mean(), abs=50 * EPS32)


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
    # float64 throughout: the two ways (4 + 4 rows gathered, gradients all-reduced, vs 8 rows) differ only in
    # summation order, ~10 eps64 ~ 2e-15 relative on O(1) values; 1e-10 leaves room, and a rank's missing
    # gradient contribution would show at O(1).
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result["grad"], weight.grad, rtol=1e-10, atol=1e-12)


def test_lambda_schedule_halves_every_half_life():
    # Python floats (float64): 2 ** x is within an ulp or two, far inside approx's default rel=1e-6.
    assert proj_coeff_at(0, 0.5, 1000, "exp") == pytest.approx(0.5)
    assert proj_coeff_at(1000, 0.5, 1000, "exp") == pytest.approx(0.25)
    assert proj_coeff_at(2000, 0.5, 1000, "exp") == pytest.approx(0.125)
    assert proj_coeff_at(500, 0.5, 1000, "exp") == pytest.approx(0.5 / math.sqrt(2))
    assert all(proj_coeff_at(s, 0.5, 1000, "none") == 0.5 for s in (0, 1000, 10 ** 6))


@pytest.mark.parametrize("path_type,t_of_sigma", [
    ("linear", lambda s: s / (1 + s)), ("cosine", lambda s: 2 / math.pi * math.atan(s))])
def test_lognormal_times_follow_the_edm_mapping(path_type, t_of_sigma):
    torch.manual_seed(0)
    t = sample_time(40000, "lognormal", get_path(path_type)).numpy()
    # sigma = exp(N(0,1)): its 16%, 50% and 84% quantiles are e^-1, 1, e^1; t is monotone in sigma.
    # A statistical bound, not a rounding one: the standard error of a sample quantile of 40000 draws is
    # sqrt(q (1 - q) / n) / pdf(z) <= 0.008 in z, times dt/dz <= 0.32: <= 0.002 in t; abs=0.01 is 5 of those.
    for q, z in ((0.1587, -1.0), (0.5, 0.0), (0.8413, 1.0)):
        assert np.quantile(t, q) == pytest.approx(t_of_sigma(math.exp(z)), abs=0.01)
    u = sample_time(40000, "uniform", get_path(path_type)).numpy()
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01  # 0.01 = 7 standard errors (0.0014)


class RecordingModel(torch.nn.Module):
    """Returns fixed outputs and records its inputs: isolates Objective's arithmetic."""

    def __init__(self, velocity, projection):
        super().__init__()
        self.velocity, self.projection, self.calls = velocity, projection, []

    def forward(self, x, t, y, force_drop_ids=None, return_projections=True):
        self.calls.append((x, t, y, return_projections))
        self.force_drop_ids = force_drop_ids
        return self.velocity, [self.projection] if return_projections else []


def test_phase1_objective_uses_clean_latents_at_t0_and_alignment_only():
    latents, labels = torch.randn(4, 4, 2, 2), torch.arange(4)
    proj, teacher = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    model = RecordingModel(None, proj)
    loss, logs = Objective(velocity=False, align="ntxent", ntxent_temp=0.2)(model, latents, labels, [teacher], 7)
    x, t, y, _ = model.calls[0]
    assert torch.equal(x, latents) and torch.equal(t, torch.zeros(4)) and torch.equal(y, labels)
    # The same float32 computation on the same inputs (0 + 1.0 * mean of one loss is exact): approx's default
    # rel=1e-6 is over 8 ulps.
    assert loss.item() == pytest.approx(ntxent_loss(proj, teacher, 0.2).item())
    assert "velocity_loss" not in logs


def test_phase2_objective_is_velocity_plus_decayed_alignment():
    torch.manual_seed(0)
    latents, labels = torch.randn(4, 4, 2, 2), torch.arange(4)
    proj, teacher = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    path = get_path("linear")
    model = RecordingModel(torch.zeros(4, 4, 2, 2), proj)
    objective = Objective(velocity=True, align="cosine", path=path, proj_coeff=0.5, proj_half_life=10,
                          proj_decay="exp", cfg_prob=0.1)
    torch.manual_seed(3)
    loss, logs = objective(model, latents, labels, [teacher], step=10)
    x_t, t, _, _ = model.calls[0]
    torch.manual_seed(3)                                             # replay the same draws, in the same order
    drop_ref = (torch.rand(4) < 0.1).long()  # seed 3: 0.004, 0.106, 0.286, 0.027
    t_ref = torch.rand(4)
    noise = torch.randn_like(latents)
    tt = t_ref.view(-1, 1, 1, 1)
    torch.testing.assert_close(t, t_ref)
    assert torch.equal(model.force_drop_ids, drop_ref) and 0 < drop_ref.sum() < 4  # labels to drop, drawn here
    # float32 defaults (rtol 1.3e-6, atol 1e-5): three roundings of O(1) values, ~4e-7 at most.
    torch.testing.assert_close(x_t, (1 - tt) * latents + tt * noise)
    velocity_mse = ((noise.double() - latents.double()) ** 2).mean()  # model predicts 0; target = eps - x
    expected = velocity_mse + 0.25 * cosine_loss(proj, teacher)
    # The objective's MSE is a float32 mean of 64 non-negative terms: within ~66 eps (63 additions, the square,
    # the division, the final sum) = 7.9e-6 relative of the float64 one above whatever the summation order (the
    # cosine term is the same float32 computation on both sides): rel = 100 eps = 1.2e-5. A wrong lambda moves
    # the loss by ~2e-2 relative here.
    assert loss.item() == pytest.approx(expected.item(), rel=100 * EPS32)
    assert logs["lambda_used"].item() == pytest.approx(0.25)


def test_batch_random_rows_do_not_depend_on_the_process_count_or_the_accumulation():
    """The sampler deals the data stream round-robin: in micro-batch a of a step, local row i of rank r is row
    (a * B + i) * world + r of the step's global batch. Each process's draws must be those rows of the draw that one
    process makes for the whole step in one micro-batch, from the same seed, for every draw in turn."""
    rows = 12

    def draws(rank, world, index=0, steps=1):
        torch.manual_seed(11)
        rng = BatchRandom(rank, world, index, steps)
        n = rows // (world * steps)
        return rng.randn((n, 2, 3)), rng.rand((n,)), sample_time(n, "uniform", get_path("linear"), rng=rng)

    single = draws(0, 1)
    for world in (1, 2, 3):
        for steps in (1, 2):
            local = rows // (world * steps)
            for index in range(steps):
                for rank in range(world):
                    mine_rows = [(index * local + i) * world + rank for i in range(local)]
                    for mine, full in zip(draws(rank, world, index, steps), single):
                        assert torch.equal(mine, full[mine_rows]), (world, steps, index, rank)


def test_batch_random_refuses_an_index_outside_its_range():
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        BatchRandom(2, 2)
    with pytest.raises(ValueError, match="accumulation index 2 is not in 0..1"):
        BatchRandom(0, 1, 2, 2)


# alpha_t, sigma_t and their derivatives, written from the definitions (erw/transport.py's docstring), in float64.
PATH_FORMULAS = {
    "linear": lambda t: (1 - t, t, -np.ones_like(t), np.ones_like(t)),
    "cosine": lambda t: (np.cos(np.pi * t / 2), np.sin(np.pi * t / 2), -np.pi / 2 * np.sin(np.pi * t / 2),
                         np.pi / 2 * np.cos(np.pi * t / 2)),
}


class HalfTheTrueVelocity(torch.nn.Module):
    """Predicts half of the true velocity of the x_t it is given: it recovers the noise the objective drew from
    x_t = alpha x + sigma eps with the closed form above (float64) and returns 0.5 (d_alpha x + d_sigma eps). The
    objective's loss must then be mean((0.5 v)^2): a target of the wrong sign gives mean((1.5 v)^2), nine times
    more, and a wrong interpolant or derivative leaves the recovered velocity off the objective's target."""

    def __init__(self, latents, path_type):
        super().__init__()
        self.x, self.formula = latents.double().numpy(), PATH_FORMULAS[path_type]

    def forward(self, x_t, t, y, force_drop_ids=None, return_projections=True):
        tt = t.double().numpy().reshape(-1, 1, 1, 1)
        alpha, sigma, d_alpha, d_sigma = self.formula(tt)
        x_t = x_t.detach().double().numpy()
        eps = (x_t - alpha * self.x) / sigma
        self.t, self.eps, self.velocity = tt, eps, d_alpha * self.x + d_sigma * eps
        # What float32 rounding of x_t (and of the objective's own alpha, sigma and target) may leave in the
        # recovered velocity, per element: 4 roundings of each term of x_t, magnified by d_sigma / sigma through the
        # recovered noise, and 4 of each term of the target.
        x_t_error = 4 * EPS32 * (np.abs(alpha * self.x) + np.abs(sigma * eps))
        self.velocity_error = np.abs(d_sigma) * x_t_error / sigma + 4 * EPS32 * (
            np.abs(d_alpha * self.x) + np.abs(d_sigma * eps))
        return torch.from_numpy(0.5 * self.velocity).float(), []


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_velocity_loss_of_a_known_prediction_is_the_path_formula(path_type, weighting):
    g = torch.Generator().manual_seed(5)
    latents, labels = torch.randn(16, 4, 2, 2, generator=g), torch.arange(16) % 10
    model = HalfTheTrueVelocity(latents, path_type)
    objective = Objective(velocity=True, align=None, path=get_path(path_type), weighting=weighting)
    torch.manual_seed(0)
    loss, logs = objective(model, latents, labels, [], step=3)
    assert np.all((model.t > 0) & (model.t < 1))
    expected = 0.25 * np.mean(model.velocity ** 2)
    # The float32 loss against the float64 one: the prediction error (-0.5 v + (v - v32)) squared differs from
    # 0.25 v^2 by at most |v| |v - v32| per element (plus the prediction's own float32 rounding), and the mean of 64
    # squares adds 66 eps relative. The bound is computed from this draw's own values (small sigma_t magnifies it).
    v = np.abs(model.velocity)
    bound = np.mean(v * (model.velocity_error + EPS32 * v)) + 66 * EPS32 * expected
    assert bound < 1e-3 * expected  # informative: a wrong sign, path or derivative moves the loss by O(1)
    assert logs["velocity_loss"].item() == pytest.approx(expected, abs=bound)
    assert loss.item() == pytest.approx(expected, abs=bound)
    # The noise it recovered is the standard normal the objective drew: mean 0, variance 1 over 64 values
    # (standard errors 0.125 and 0.18; the bounds are 4 of them).
    assert abs(model.eps.mean()) < 0.5 and abs(model.eps.var() - 1) < 0.7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_alignment_losses_inside_autocast_are_the_float32_computation(dtype):
    """The training step runs the projector under autocast, so the alignment losses get half-precision inputs inside
    an autocast region; NT-Xent's logits (up to 1/tau = 10) and the cosines must still be computed in float32."""
    g = torch.Generator().manual_seed(2)
    h, y = (torch.randn(8, 4, 16, generator=g).to(dtype) for _ in range(2))  # what a projector under autocast gives
    reference = ntxent_reference(h.double().numpy(), y.double().numpy(), 0.1)  # the same values, float64
    with torch.autocast("cpu", dtype=dtype):
        loss = ntxent_loss(h, y, 0.1)
    assert loss.dtype == torch.float32
    # float32: normalizing D = 16 values and their dot products leave each logit within (D + 5) eps / tau of the
    # exact one; the loss, a log-sum-exp minus a logit, within twice that plus the lse's own rounding: 64 eps / tau
    # = 7.6e-5. The same logits in bf16 (8 mantissa bits) are ~0.04 off, fp16's ~0.005.
    assert loss.item() == pytest.approx(reference, abs=64 * EPS32 / 0.1)
    # REPA's cosine loss too: float32 cosines of the same values (within (D + 6) eps each, see the cosine test),
    # where bf16 would leave ~4e-3.
    hn, yn = h.double().numpy(), y.double().numpy()
    cos = (hn * yn).sum(-1) / (np.linalg.norm(hn, axis=-1) * np.linalg.norm(yn, axis=-1))
    with torch.autocast("cpu", dtype=dtype):
        cosine = cosine_loss(h, y)
    assert cosine.dtype == torch.float32 and cosine.item() == pytest.approx(-cos.mean(), abs=50 * EPS32)
