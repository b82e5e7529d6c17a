"""The diffusion core: schedules, forward noising, posterior, samplers (against an oracle)."""
import math

import pytest
import torch
import torch.nn as nn

from DDPM import Diffusion, ddim_timesteps, extract
from train_utils import TrainConfig, cosine_beta_schedule, linear_beta_schedule


def closed_form_alphas_cumprod(T, s=0.008):
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_schedule_matches_closed_form(T):
    betas = cosine_beta_schedule(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    expected = closed_form_alphas_cumprod(T)
    # the last step is clipped to max_beta, so compare before it
    assert torch.allclose(alphas_cumprod[:-1], expected[:-1], atol=1e-6, rtol=0)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert betas[-1] == pytest.approx(0.999)  # cos^2(pi/2) = 0 would make beta_T = 1


def test_linear_schedule_and_diffusion_buffers():
    betas = linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    for schedule in ("cosine", "linear"):
        d = Diffusion(1000, schedule=schedule)
        assert d.alphas_cumprod.dtype == torch.float32
        assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
        # beta~_0 = 0 (x_0 is not noised); its log is clipped to the t=1 value, the rest
        # is the log of the posterior variance itself
        variance = d.posterior_variance.double()
        log_variance = d.posterior_log_variance_clipped.double()
        assert variance[0] == 0 and (variance[1:] > 0).all()
        assert log_variance[0] == log_variance[1]
        assert torch.allclose(log_variance[1:], variance[1:].log(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_schedule_shift_divides_snr_by_shift_squared(schedule, shift):
    make = cosine_beta_schedule if schedule == "cosine" else linear_beta_schedule
    abar = lambda betas: torch.cumprod(1 - betas, 0)  # noqa: E731  float64
    snr = lambda a: a / (1 - a)  # noqa: E731
    plain, shifted = abar(make(1000)), abar(make(1000, shift=shift))
    keep = plain > 1e-4   # the clipped last cosine step has abar ~ 0
    ratio = snr(plain[keep]) / snr(shifted[keep])
    assert torch.allclose(ratio, torch.full_like(ratio, shift ** 2), rtol=1e-6)
    assert (shifted[1:] < shifted[:-1]).all() and shifted[-1] < 1e-3
    d = Diffusion(1000, schedule=schedule, shift=shift)
    assert d.shift == shift and torch.equal(d.betas, make(1000, shift=shift).float())
    assert (d.betas <= 0.999).all() and torch.isfinite(d.posterior_log_variance_clipped).all()
    # shift 1 is the published schedule: the cosine closed form, Ho's linspace exactly
    if schedule == "cosine":
        assert torch.allclose(abar(make(1000, shift=1.0))[:-1],
                              closed_form_alphas_cumprod(1000)[:-1], atol=1e-6, rtol=0)
    else:
        assert torch.equal(make(1000, shift=1.0), torch.linspace(1e-4, 0.02, 1000,
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("shift", [0.0, -2.0, float("nan"), float("inf")])
def test_schedule_shift_must_be_finite_and_positive(shift):
    with pytest.raises(ValueError, match="shift"):
        Diffusion(100, shift=shift)
    if shift == 0:   # in a config, 0 asks for the rule by image size
        assert TrainConfig(schedule_shift=shift).schedule_shift > 0
        return
    with pytest.raises(ValueError, match="schedule_shift"):
        TrainConfig(schedule_shift=shift)


def test_noise_image_matches_formula():
    d = Diffusion(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g).round() * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t, returned = d.noise_image(x0, t, noise)
    assert returned is noise
    abar = closed_form_alphas_cumprod(1000).float()
    abar[-1] = d.alphas_cumprod[-1]  # the clipped final step
    for i, ti in enumerate(t.tolist()):
        expected = abar[ti].sqrt() * x0[i] + (1 - abar[ti]).sqrt() * noise[i]
        assert torch.allclose(x_t[i], expected, atol=1e-5)


def test_posterior_matches_ho_eq7():
    d = Diffusion(100)
    betas = d.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 4, 4, generator=g)
    x_t = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([1, 50, 99])
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        abar_prev = abar[ti - 1]
        mu = (abar_prev.sqrt() * betas[ti] / (1 - abar[ti]) * x0[i].double()
              + (1 - betas[ti]).sqrt() * (1 - abar_prev) / (1 - abar[ti]) * x_t[i].double())
        beta_tilde = (1 - abar_prev) / (1 - abar[ti]) * betas[ti]
        assert torch.allclose(mean[i].double(), mu, atol=1e-5)
        assert var[i].item() == pytest.approx(beta_tilde.item(), rel=1e-5)
        assert log_var[i].item() == pytest.approx(math.log(beta_tilde.item()), abs=1e-4)
    # at t=0 the posterior mean is x0 itself
    mean0, _, _ = d.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(mean0, x0, atol=1e-6)


def test_prediction_types_round_trip():
    """x0 and eps recovered from each prediction type agree with the truth."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 100, 600, 990])
    for prediction in ("eps", "x0", "v"):
        d = Diffusion(1000, prediction=prediction)
        x_t, noise = d.noise_image(x0, t, torch.randn(x0.shape, generator=g))
        target = d.training_target(x0, noise, t)
        x0_hat, eps_hat = d.predict_x0_eps(x_t, t, target, clip=False)
        assert torch.allclose(x0_hat, x0, atol=2e-3), prediction
        assert torch.allclose(eps_hat[1:], noise[1:], atol=2e-3), prediction


def test_ddim_grid_rule():
    assert ddim_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    grid = ddim_timesteps(1000, 50)
    assert grid[0] == 999 and grid[-1] == 0 and len(set(grid)) == 50
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_ddim_grid_with_a_time_floor_skips_the_floored_steps():
    """With a floor the grid starts at T-1 and spends every later step in 0..L (trailing
    spacing, t=0 left out); without one it is the grid above, so older runs sample as before."""
    assert ddim_timesteps(1000, 2, last_model_t=286) == [999, 143]
    assert ddim_timesteps(1000, 5, last_model_t=286) == [999, 229, 172, 114, 57]
    assert ddim_timesteps(1000, 1, last_model_t=286) == [999]
    assert ddim_timesteps(1000, 10, last_model_t=999) == ddim_timesteps(1000, 10)
    assert ddim_timesteps(1000, 71, last_model_t=71) == [999, *range(70, 0, -1)]
    with pytest.raises(ValueError, match="at most 71"):
        ddim_timesteps(1000, 72, last_model_t=71)
    d = Diffusion(1000, prediction="x0", shift=64, input_scaling="abar", time_floor=1e-3)
    assert d.last_model_t == 286 and d.max_ddim_steps == 286
    assert Diffusion(1000).max_ddim_steps == 1000
    seen = []
    model = lambda x, t: (seen.append(int(t[0])), torch.zeros_like(x[:, :1]))[1]  # noqa: E731
    model.parameters = lambda: iter([torch.zeros(1)])
    list(d.sample_progressive(model, torch.zeros(1, 1, 8, 8), steps=3))
    assert seen == [286, 191, 95]   # T-1 reaches the network as L, then the grid's own t


class Oracle(nn.Module):
    """Knows the true mask: returns the exact eps / x0 / v for whatever x_t it is given."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.d = diffusion
        self.x0 = x0
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the sampler a device and dtype
        self.calls = []

    def forward(self, x_in, t):
        self.calls.append(t.clone())
        x_t = x_in[:, :1]
        sqrt_ac = extract(self.d.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_1m_ac = extract(self.d.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        eps = (x_t - sqrt_ac * self.x0) / sqrt_1m_ac
        return self.d.training_target(self.x0, eps, t)


def known_mask():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 3:10, 4:12] = 1
    mask[1, :, 8:, :5] = 1
    return mask


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [None, 50, 10])
def test_oracle_sampling_recovers_mask(prediction, steps):
    d = Diffusion(1000, prediction=prediction)
    mask = known_mask()
    model = Oracle(d, mask * 2 - 1)
    image = torch.rand(2, 1, 16, 16)
    probs = d.sample(model, image, steps=steps, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (2, 1, 16, 16)
    assert torch.allclose(probs, mask, atol=1e-3)
    expected_calls = 1000 if steps is None else steps
    assert len(model.calls) == expected_calls
    assert model.calls[0][0].item() == 999 and model.calls[-1][0].item() == 0


def test_stochastic_ddim_also_recovers_mask():
    d = Diffusion(1000)
    mask = known_mask()
    probs = d.sample(Oracle(d, mask * 2 - 1), torch.rand(2, 1, 16, 16), steps=25, eta=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.allclose(probs, mask, atol=1e-3)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_in, t):
        return self.conv(x_in) * (1 + t.float()[:, None, None, None] / 1000)


@pytest.mark.parametrize("steps,eta", [(None, 0.0), (10, 0.0), (10, 1.0)])
def test_seeded_sampling_is_deterministic(steps, eta):
    d = Diffusion(1000)
    torch.manual_seed(0)
    model = TinyNet()
    image = torch.rand(3, 1, 8, 8)
    a = d.sample(model, image, steps=steps, eta=eta, generator=torch.Generator().manual_seed(5))
    b = d.sample(model, image, steps=steps, eta=eta, generator=torch.Generator().manual_seed(5))
    c = d.sample(model, image, steps=steps, eta=eta, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert model.training  # sample() restores the model's mode
    # sample() is the last x0 of sample_progressive(), mapped from [-1, 1] to [0, 1]
    with torch.no_grad():
        *_, (t_last, _, x0) = d.sample_progressive(model.eval(), image, steps=steps, eta=eta,
                                                   generator=torch.Generator().manual_seed(5))
    assert t_last == 0 and torch.equal(a, ((x0 + 1) / 2).clamp(0, 1))


def test_sample_timesteps_uniform_range():
    d = Diffusion(50)
    t = d.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min() == 0 and t.max() == 49
    counts = torch.bincount(t, minlength=50).float()
    assert counts.std() / counts.mean() < 0.1


def _standardised(d, x_t, x0, t_int):
    abar = d.alphas_cumprod[t_int]
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def test_ddim_eta0_trajectory_keeps_initial_noise():
    """With an exact model, deterministic DDIM moves along x_t = sqrt(abar) x0 + sqrt(1-abar) z
    with the same z all the way (Song et al. eq. 12 with sigma = 0)."""
    d = Diffusion(1000)
    x0 = known_mask() * 2 - 1
    model = Oracle(d, x0)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    grid = ddim_timesteps(1000, 10)
    steps = list(d.sample_progressive(model, torch.rand(2, 1, 16, 16), steps=10, generator=g))
    for (_, x_prev, _), t_prev in zip(steps[:-1], grid[1:]):
        assert torch.allclose(_standardised(d, x_prev, x0, t_prev), z, atol=1e-3)


def test_ancestral_trajectory_follows_forward_marginals():
    """With an exact model, every ancestral x_t is distributed as q(x_t | x0): standardised
    by the forward process it is N(0, 1) (Ho et al. eqs. 4 and 6)."""
    d = Diffusion(1000)
    x0 = (torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5) * 2.0 - 1
    model = Oracle(d, x0)
    g = torch.Generator().manual_seed(4)
    checked = 0
    for t_int, x_prev, _ in d.sample_progressive(model, torch.rand(4, 1, 64, 64), generator=g):
        if t_int - 1 in (700, 300, 50, 5):
            z = _standardised(d, x_prev, x0, t_int - 1)
            assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03, t_int
            checked += 1
    assert checked == 4
