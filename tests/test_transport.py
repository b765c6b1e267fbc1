"""erw/transport.py against closed forms of the linear and cosine interpolants."""
import math

import pytest
import torch

from erw.transport import get_path

# Everything here is float64 (eps 2.2e-16) on values of at most ~5: a few roundings are ~1e-15, so atol=1e-12
# means "equal up to rounding" with room, and still fails on any wrong coefficient (an O(1) change).
EPS64 = torch.finfo(torch.float64).eps

# Closed forms written out independently of the module: (alpha, sigma, d_alpha, d_sigma) as functions of t.
CLOSED_FORMS = {
    "linear": (lambda t: 1 - t, lambda t: t, lambda t: -torch.ones_like(t), lambda t: torch.ones_like(t)),
    "cosine": (lambda t: torch.cos(math.pi * t / 2), lambda t: torch.sin(math.pi * t / 2),
               lambda t: -math.pi / 2 * torch.sin(math.pi * t / 2), lambda t: math.pi / 2 * torch.cos(math.pi * t / 2)),
}


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, noise, t


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_interpolant_and_velocity_target_match_closed_form(path_type):
    path = get_path(path_type)
    assert path.name == path_type
    alpha, sigma, d_alpha, d_sigma = CLOSED_FORMS[path_type]
    x, noise, t = _batch()
    x_t, v = path.interpolate(x, noise, t)
    tb = t[:, None, None, None]
    torch.testing.assert_close(x_t, alpha(tb) * x + sigma(tb) * noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(v, d_alpha(tb) * x + d_sigma(tb) * noise, rtol=0, atol=1e-12)
    # Endpoints: t = 0 is data, t = 1 is noise.
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x_ends, _ = path.interpolate(x[:2], noise[:2], ends)
    torch.testing.assert_close(x_ends[0], x[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(x_ends[1], noise[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_velocity_target_is_time_derivative_of_x_t(path_type):
    path = get_path(path_type)
    x, noise, t = _batch(seed=1)
    h = 1e-6
    x_plus, _ = path.interpolate(x, noise, t + h)
    x_minus, _ = path.interpolate(x, noise, t - h)
    _, v = path.interpolate(x, noise, t)
    # Central difference: truncation h^2 / 6 |d^3 x_t / dt^3| <~ 1e-12 * (pi/2)^3 * 5 / 6 ~ 3e-12, rounding
    # eps64 |x_t| / h ~ 1e-9: atol=1e-8 (a wrong derivative is off by O(1)).
    torch.testing.assert_close((x_plus - x_minus) / (2 * h), v, rtol=0, atol=1e-8)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_d_alpha_sigma_are_derivatives(path_type):
    path = get_path(path_type)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    (a_plus, s_plus), (a_minus, s_minus) = path.alpha_sigma(t + h), path.alpha_sigma(t - h)
    d_alpha, d_sigma = path.d_alpha_sigma(t)
    # as above with |alpha|, |sigma| <= 1: truncation <~ 1e-12, rounding <~ eps64 / h = 2e-10
    torch.testing.assert_close((a_plus - a_minus) / (2 * h), d_alpha, rtol=0, atol=1e-8)
    torch.testing.assert_close((s_plus - s_minus) / (2 * h), d_sigma, rtol=0, atol=1e-8)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_of_the_conditional_velocity_is_minus_eps_over_sigma(path_type):
    # With v and x_t built from the same (x, eps), x can be eliminated exactly: score = -eps / sigma_t.
    path = get_path(path_type)
    x, noise, t = _batch(seed=2)
    x_t, v = path.interpolate(x, noise, t)
    sigma = CLOSED_FORMS[path_type][1](t)[:, None, None, None]
    # Eliminating x cancels terms of size ~5 before dividing by sigma >= 0.05: <~ 10 eps64 * 5 / 0.05 = 2e-13.
    torch.testing.assert_close(path.velocity_to_score(v, x_t, t), -noise / sigma, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_for_point_mass_data(path_type):
    # Data = delta at x0: p_t = N(alpha x0, sigma^2), exact velocity d_alpha x0 + d_sigma (x_t - alpha x0) / sigma,
    # exact score -(x_t - alpha x0) / sigma^2.
    path = get_path(path_type)
    alpha, sigma, d_alpha, d_sigma = CLOSED_FORMS[path_type]
    x0, x_t, t = _batch(seed=3)
    tb = t[:, None, None, None]
    v = d_alpha(tb) * x0 + d_sigma(tb) * (x_t - alpha(tb) * x0) / sigma(tb)
    score = -(x_t - alpha(tb) * x0) / sigma(tb) ** 2
    # |score| <~ 5 / sigma^2 ~ 2e3: float64 rounding <~ 10 eps64 |score| ~ 5e-12, inside rtol=1e-9.
    torch.testing.assert_close(path.velocity_to_score(v, x_t, t), score, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_one_time_for_the_whole_batch_equals_per_sample_times(path_type):
    path = get_path(path_type)
    x, noise, _ = _batch(seed=4)
    t_scalar = torch.tensor(0.3, dtype=torch.float64)
    t_batch = torch.full((x.shape[0],), 0.3, dtype=torch.float64)
    # Mathematically equal. The 0-dim and the (6,) times may reach sin/cos through different kernels (scalar or
    # vectorised, which can differ by an ulp), so allow 1-ulp coefficients carried through a few float64
    # operations: |x|, |noise| <= 4, so <~ 8 eps64 * 8 = 1.4e-14 for x_t and v; the score also divides by
    # sigma (alpha d_sigma - d_alpha sigma) >= 0.3: 1e-13. Broadcasting the wrong time would be off by O(1).
    for a, b in zip(path.interpolate(x, noise, t_scalar), path.interpolate(x, noise, t_batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS64)
    torch.testing.assert_close(path.velocity_to_score(noise, x, t_scalar), path.velocity_to_score(noise, x, t_batch),
                               rtol=0, atol=1e-13)


def test_score_at_pure_noise_is_minus_x():
    # At t = 1 (alpha = 0) both paths give p_1 = N(0, I), whose score is -x, whatever the data.
    x_t = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.ones(3, dtype=torch.float64)
    for path_type in ("linear", "cosine"):
        v = torch.randn_like(x_t)
        torch.testing.assert_close(get_path(path_type).velocity_to_score(v, x_t, t), -x_t, rtol=0, atol=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown path type 'gvp'"):
        get_path("gvp")
    with pytest.raises(ValueError, match=r"t must have shape \(N,\) = \(2,\) or be 0-dim"):
        get_path("linear").interpolate(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(3))
