"""Training: noise schedules, the loss, EMA and the training loop."""
import math

import torch


def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999):
    """Improved-DDPM eq. 17: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), normalised so
    abar(0) = 1, and beta_t = min(1 - abar(t+1)/abar(t), max_beta). Float64, shape (T,).

    max_beta stops the last step from being a certain jump to pure noise (beta = 1).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    """Ho et al.'s linear schedule, rescaled so any T gives the same overall noise as T=1000."""
    scale = 1000 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
