"""erw/samplers.py on a Gaussian data distribution (whose exact velocity is known in closed form), one SDE step
against a hand computation, CFG call accounting; erw/generation.py's per-sample seeding."""
import math

import numpy as np
import pytest
import torch

from erw.generation import sample_inputs, sample_seed
from erw.samplers import (GuidedVelocity, model_evaluations_per_sample, run_in_chunks, sample_batch, sample_ode,
                          sample_sde, sde_time_grid, standard_normal)
from erw.transport import get_path

# Data x ~ N(MU, S^2) per channel (2 channels, 1x1 "images"); eps ~ N(0, 1).
MU = torch.tensor([1.5, -0.5], dtype=torch.float64).view(1, 2, 1, 1)
S = torch.tensor([0.5, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
NUM_GAUSSIAN_SAMPLES = 16000

COEFFICIENTS = {  # t -> (alpha, sigma, d_alpha, d_sigma), written out independently of erw/transport.py
    "linear": lambda t: (1 - t, t, -torch.ones_like(t), torch.ones_like(t)),
    "cosine": lambda t: (torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2),
                         -math.pi / 2 * torch.sin(math.pi * t / 2), math.pi / 2 * torch.cos(math.pi * t / 2)),
}


@pytest.fixture(autouse=True)
def one_thread():
    """These loops run thousands of small elementwise ops: on a shared machine, handing each to a second thread
    costs far more than the work (measured 0.1 s on one thread against 1-16 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_velocity(path_type):
    """E[v | x_t] for Gaussian data: x_t ~ N(alpha mu, V), V = alpha^2 s^2 + sigma^2, and by Gaussian conditioning
    E[x | x_t] = mu + alpha s^2 (x_t - alpha mu) / V, E[eps | x_t] = sigma (x_t - alpha mu) / V."""
    def velocity(x, t, y):
        alpha, sigma, d_alpha, d_sigma = COEFFICIENTS[path_type](torch.tensor(t, dtype=torch.float64))
        var = alpha ** 2 * S ** 2 + sigma ** 2
        return d_alpha * MU + (d_alpha * alpha * S ** 2 + d_sigma * sigma) * (x - alpha * MU) / var
    return velocity


def _gaussian_noise(n=NUM_GAUSSIAN_SAMPLES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 1, 1, generator=generator, dtype=torch.float64), generator


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_recovers_gaussian_mean_and_std(path_type):
    # Tolerance 0.04 (in units of s): the Monte-Carlo standard errors are 0.008 (mean) and 0.006 (relative std)
    # at 16000 samples, and 250 Euler-Maruyama steps add about 0.01; wrong noise or drift scales (e.g. a missing
    # factor 2 in the noise, or 2 w_t in the drift) move the std by 15-30 %.
    noise, generator = _gaussian_noise()
    labels = torch.zeros(len(noise), dtype=torch.int64)
    x = sample_sde(gaussian_velocity(path_type), noise, labels, 250, get_path(path_type), generator)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
    assert torch.all((mean - MU).abs() / S < 0.04), (mean.flatten(), MU.flatten())
    assert torch.all((std / S - 1).abs() < 0.04), (std.flatten(), S.flatten())


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("heun,tolerance", [(False, 0.08), (True, 3e-4)])
def test_ode_follows_the_exact_gaussian_flow_map(path_type, heun, tolerance):
    # The exact flow of an affine velocity field between Gaussians is the monotone affine map x_0 = mu + s z, so each
    # sample (not only the moments) must land there. Measured errors at 250 steps: Euler 0.05 (linear) / 0.013
    # (cosine), Heun 1e-4.
    noise, _ = _gaussian_noise(n=2000)
    labels = torch.zeros(len(noise), dtype=torch.int64)
    x = sample_ode(gaussian_velocity(path_type), noise, labels, 250, heun=heun)
    assert (x - (MU + S * noise)).abs().max() < tolerance


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_steps_match_a_hand_computation(path_type):
    # Three evaluations at t = 1, 0.52, 0.04: two stochastic steps and the final mean step, written out plainly
    # with w_t = sigma_t and score = -(x - alpha mu) / V (the exact Gaussian score, not derived from v).
    noise, _ = _gaussian_noise(n=4, seed=1)
    labels = torch.zeros(4, dtype=torch.int64)
    x = sample_sde(gaussian_velocity(path_type), noise, labels, 3, get_path(path_type),
                   torch.Generator().manual_seed(7))

    step_noise = torch.Generator().manual_seed(7)
    expected = noise.clone()
    times = [1.0, 0.52, 0.04, 0.0]
    for i in range(3):
        t, dt = times[i], times[i + 1] - times[i]
        alpha, sigma, _, _ = COEFFICIENTS[path_type](torch.tensor(t, dtype=torch.float64))
        score = -(expected - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)
        drift = gaussian_velocity(path_type)(expected, t, labels) - sigma * score
        expected = expected + drift * dt
        if i < 2:
            expected = expected + torch.sqrt(2 * sigma * abs(dt)) * torch.randn(
                expected.shape, generator=step_noise, dtype=torch.float64)
    # float64 (eps 2.2e-16) on both sides, three steps on O(1) values; the sampler gets the score from v, dividing
    # by sigma >= 0.04, so the two differ by <~ 100 eps64 ~ 2e-14: rtol=atol=1e-10 still sees any wrong factor.
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


def test_per_sample_step_noise_makes_rows_independent_of_the_batch():
    velocity = gaussian_velocity("cosine")
    noise, _ = _gaussian_noise(n=5, seed=2)
    labels = torch.zeros(5, dtype=torch.int64)
    path = get_path("cosine")
    batched = sample_sde(velocity, noise, labels, 20, path, [torch.Generator().manual_seed(i) for i in range(5)])
    # Exact equality is sound here: the chain is float64 +, -, *, / (correctly rounded whatever the vector width)
    # plus sin/cos/sqrt of the time as one 0-dim tensor, the same for both batch sizes; each row's noise comes from
    # its own generator with the same shape.
    for i in (0, 3):
        alone = sample_sde(velocity, noise[i:i + 1], labels[i:i + 1], 20, path, [torch.Generator().manual_seed(i)])
        assert torch.equal(alone[0], batched[i])


def test_per_sample_noise_is_each_generators_own_randn():
    generators = [torch.Generator().manual_seed(s) for s in (3, 1, 4)]
    rows = standard_normal((3, 4, 5, 5), generators, "cpu")
    for row, seed in zip(rows, (3, 1, 4)):
        assert torch.equal(row, torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(seed),
                                            dtype=torch.float64))


def test_a_sampling_step_reads_no_device_value():
    """The whole SDE sampler with a SiT under guidance calls nothing that copies a tensor's value to the host
    (.item(), float(), bool(), .tolist(), .cpu(), ...): on a GPU each such read waits for every queued kernel.
    (tests/test_gpu.py watches the copies of the per-sample noise too.)"""
    from models.sit import create_sit
    from tests.test_loop import HostReadWatch
    model = create_sit("SiT-Tiny/2", input_size=8, num_classes=10, z_dims=[]).eval()
    velocity = GuidedVelocity(model, cfg_scale=1.5, guidance_low=0.0, guidance_high=0.7)
    noise, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    sde_time_grid(4)  # the grid is made once per step count, here before the watch
    watch = HostReadWatch()
    watch.step = 0
    with watch:
        x = sample_batch("sde", velocity, noise, labels, 4, get_path("cosine"), noise_source=generators)
    assert not watch.reads, watch.reads
    assert x.shape == noise.shape and torch.isfinite(x).all()


class RecordingModel(torch.nn.Module):
    """Stands in for a SiT: v = label (as a float) everywhere; records each call's batch size, times and labels."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y, return_projections=True):
        assert return_projections is False, "sampling must skip the projector heads"
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone(), []


@pytest.mark.parametrize("mode,heun", [("sde", False), ("ode", False), ("ode", True)])
def test_cfg_evaluations_and_batch_sizes_follow_the_interval(mode, heun):
    model = RecordingModel()
    low, high, scale, n, steps = 0.25, 0.65, 4.0, 3, 10  # bounds off the time grids
    velocity = GuidedVelocity(model, cfg_scale=scale, guidance_low=low, guidance_high=high)
    labels = torch.tensor([1, 2, 7])
    noise = torch.zeros(n, 4, 2, 2)
    sample_batch(mode, velocity, noise, labels, steps, get_path("linear"), heun=heun,
                 noise_source=torch.Generator().manual_seed(0))

    if mode == "sde":
        call_times = list(np.linspace(1.0, 0.04, steps))
    else:
        grid = np.linspace(1.0, 0.0, steps + 1)
        call_times = []
        for i in range(steps):
            call_times.append(grid[i])
            if heun and i < steps - 1:
                call_times.append(grid[i + 1])
    assert len(model.calls) == len(call_times) == model_evaluations_per_sample(mode, steps, heun)
    for (batch, t, y), t_expected in zip(model.calls, call_times):
        guided = low <= t_expected <= high
        assert batch == (2 * n if guided else n)
        # float64 defaults (rtol=atol=1e-7): the model sees t in float32 (rounding 6e-8 relative); grid steps
        # are 0.1 apart.
        torch.testing.assert_close(t.double(), torch.full((batch,), t_expected, dtype=torch.float64))
        expected_labels = torch.cat([labels, torch.full((n,), 10)]) if guided else labels
        assert torch.equal(y, expected_labels)
    assert any(low <= t <= high for t in call_times) and not all(low <= t <= high for t in call_times)


def test_guidance_formula_on_all_channels():
    model = RecordingModel()
    velocity = GuidedVelocity(model, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0)
    labels = torch.tensor([2, 6])
    v = velocity(torch.zeros(2, 4, 2, 2, dtype=torch.float64), 0.5, labels)
    # cond = label, uncond = null label 10: 10 + 1.5 * (label - 10), on every channel.
    expected = (10 + 1.5 * (labels.double() - 10)).view(2, 1, 1, 1).expand(2, 4, 2, 2)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, expected)  # small integers and 1.5 (l - 10): exact in float32 and float64
    no_guidance = GuidedVelocity(model, cfg_scale=1.0)
    model.calls.clear()
    no_guidance(torch.zeros(2, 4, 2, 2), 0.5, labels)
    assert [c[0] for c in model.calls] == [2]


def test_chunks_cover_every_row():
    model = RecordingModel()
    velocity = GuidedVelocity(model, cfg_scale=2.0, chunk_size=2)
    labels = torch.tensor([1, 2, 3])
    v = velocity(torch.zeros(3, 4, 2, 2), 0.5, labels)
    assert [c[0] for c in model.calls] == [2, 2, 2]  # 6 rows (cond + uncond) in chunks of 2
    # exact: small integers in float32
    torch.testing.assert_close(v, (10 + 2.0 * (labels.float() - 10)).view(3, 1, 1, 1).expand(3, 4, 2, 2))


def test_a_chunk_that_runs_out_of_gpu_memory_is_split_until_it_fits():
    """A device that holds at most 3 rows per call: the whole batch of 10, then 5, fail; chunks of 3 run, and the
    result is the rows' result in order. One row that does not fit is the device's error, raised."""
    sizes = []

    def fn(x):
        sizes.append(len(x))
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return x * 2 + 1
    x = torch.arange(10.0)
    torch.testing.assert_close(run_in_chunks(fn, (x,), 0), x * 2 + 1, rtol=0, atol=0)
    assert sizes == [10, 5, 3, 3, 3, 1]
    with pytest.raises(torch.OutOfMemoryError):
        run_in_chunks(lambda x: fn(x.repeat(4)), (x,), 0)


def test_bad_settings_are_named():
    model = RecordingModel()
    with pytest.raises(ValueError, match="--cfg-scale must be >= 1"):
        GuidedVelocity(model, cfg_scale=0.5)
    with pytest.raises(ValueError, match="--guidance-low <= --guidance-high"):
        GuidedVelocity(model, cfg_scale=2.0, guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ValueError, match="--heun applies to --mode ode only"):
        sample_batch("sde", GuidedVelocity(model), torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.int64), 4,
                     get_path("linear"), heun=True, noise_source=torch.Generator())
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sample_ode(GuidedVelocity(model), torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="unknown sampling mode 'ddim'"):
        sample_batch("ddim", GuidedVelocity(model), torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.int64), 4,
                     get_path("linear"))


def test_sample_inputs_depend_only_on_seed_and_index():
    shape = (4, 2, 2)
    noise_a, labels_a, _ = sample_inputs(3, [0, 1, 2, 3, 4], shape, 10, "random")
    noise_b, labels_b, _ = sample_inputs(3, [4, 2], shape, 10, "random")
    assert torch.equal(noise_a[[4, 2]], noise_b) and torch.equal(labels_a[[4, 2]], labels_b)
    noise_c, _, _ = sample_inputs(4, [4, 2], shape, 10, "random")
    assert not torch.equal(noise_b, noise_c)
    _, balanced, _ = sample_inputs(3, list(range(30)), shape, 10, "balanced")
    assert torch.equal(torch.bincount(balanced, minlength=10), torch.full((10,), 3))


def test_sample_seeds_are_distinct_32_bit_values():
    # torch's CPU generator uses only the low 32 bits of a seed: seeds must differ within those bits.
    seeds = [sample_seed(0, i) for i in range(100_000)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2 ** 32
    assert sample_seed(0, 5) != sample_seed(1, 5)
