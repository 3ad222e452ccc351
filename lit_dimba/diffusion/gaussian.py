"""PixArt-alpha-compatible Gaussian diffusion: schedule, training targets and loss, CFG sampling.

The noise schedule and every sampler come from diffusers schedulers configured identically (1000 steps,
linear betas 1e-4 .. 0.02), so training and sampling agree on alphas. With a learned sigma (a model output
of 2C channels, as PixArt checkpoints) the loss adds IDDPM's variational bound on the variance channels
with the mean frozen, as PixArt trains; samplers use the first C channels.
"""

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from torch import nn

Sampler = Literal["dpm++", "ddim", "euler"]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of data x in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)), elementwise."""

    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_minus = cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_probs = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_probs))


@dataclass
class Noised:
    """A training batch noised at random timesteps: what the loss needs besides the model's output.

    x0: clean latents (B, C, H, W); noise: the Gaussian noise added (B, C, H, W); t: integer timesteps (B,);
    x_t: the noised latents sqrt(a_t) x0 + sqrt(1 - a_t) noise (B, C, H, W), the model's input.
    """

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor


class GaussianDiffusion(nn.Module):
    """Discrete-time DDPM with PixArt-alpha's defaults.

    Args:
        num_timesteps, beta_start, beta_end: linear beta schedule.
        prediction_type: "epsilon" (PixArt) or "v_prediction".
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.prediction_type = prediction_type
        self.schedule = dict(num_train_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule="linear", prediction_type=prediction_type)
        ddpm = DDPMScheduler(**self.schedule)
        betas = ddpm.betas.double()
        alphas_cumprod = ddpm.alphas_cumprod.double()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            posterior_log_variance=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            posterior_mean_coef_x0=betas * prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef_xt=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _at(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """values[t] reshaped to (B, 1, ..., 1) for broadcasting over a tensor of ``ndim`` dims."""
        return values[t].reshape(-1, *([1] * (ndim - 1)))

    def sample_timesteps(self, batch_size: int, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps (B,) in [0, num_timesteps), drawn from ``generator``."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> Noised:
        """Noise latents x0 (B, C, H, W) at uniform random timesteps: t (B,), then the noise (B, C, H, W), both
        drawn from ``generator`` in that order (None: the global generator)."""
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return Noised(x0, noise, t, self.add_noise(x0, noise, t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise. Shapes (B, C, H, W), t (B,)."""
        a = self._at(self.alphas_cumprod, t, x0.ndim)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the first C output channels: noise, or v = sqrt(a) noise - sqrt(1-a) x0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._at(self.alphas_cumprod, t, x0.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by the model's epsilon or v prediction at x_t."""
        a = self._at(self.alphas_cumprod, t, x_t.ndim)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction

    def variance_bound(self, x0, x_t, t, prediction, variance_output) -> torch.Tensor:
        """IDDPM's per-sample variational bound (bits per dim) for the learned-range variance, mean frozen.

        prediction: the (detached) epsilon/v channels; variance_output: (B, C, H, W) in roughly [-1, 1].
        Returns (B,).
        """
        ndim = x0.ndim
        true_mean = self._at(self.posterior_mean_coef_x0, t, ndim) * x0 + self._at(self.posterior_mean_coef_xt, t, ndim) * x_t
        true_log_var = self._at(self.posterior_log_variance, t, ndim)
        frac = (variance_output + 1) / 2
        model_log_var = frac * self._at(self.betas, t, ndim).log() + (1 - frac) * true_log_var
        x0_pred = self.predict_x0(x_t, prediction, t)
        model_mean = self._at(self.posterior_mean_coef_x0, t, ndim) * x0_pred + self._at(self.posterior_mean_coef_xt, t, ndim) * x_t
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output: torch.Tensor, noised: Noised) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,) of a model output (B, C or 2C, H, W) at ``noised.x_t``: C channels for a fixed
        variance, 2C for a learned sigma.

        Returns {"mse", "vb" (only with learned sigma), "loss"}.
        """
        x0, noise, t, x_t = noised.x0, noised.noise, noised.t, noised.x_t
        C = x0.shape[1]
        if model_output.shape[1] not in (C, 2 * C):
            raise ValueError(f"model output has {model_output.shape[1]} channels; expected {C} or {2 * C}")
        prediction = model_output[:, :C].float()
        mse = (prediction - self.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        losses = {"mse": mse, "loss": mse}
        if model_output.shape[1] == 2 * C:
            vb = self.variance_bound(x0, x_t, t, prediction.detach(), model_output[:, C:].float())
            losses.update(vb=vb, loss=mse + vb)
        return losses

    def make_scheduler(self, sampler: Sampler):
        """A diffusers scheduler for ``sampler`` on this diffusion's training schedule."""
        if sampler == "dpm++":
            return DPMSolverMultistepScheduler(**self.schedule, algorithm_type="dpmsolver++", solver_order=2)
        if sampler == "ddim":
            return DDIMScheduler(**self.schedule, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if sampler == "euler":
            return EulerDiscreteScheduler(**self.schedule, timestep_spacing="trailing")
        raise ValueError(f"unknown sampler {sampler!r}; choose one of 'dpm++', 'ddim', 'euler'")

    @torch.no_grad()
    def sample(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               sampler: Sampler = "dpm++", steps: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run a diffusers scheduler from ``noise`` (B, C, H, W) to x0.

        denoise(x_t, t) -> the model's epsilon/v prediction (B, C, H, W) for timesteps t (B,), guidance included.
        """
        scheduler = self.make_scheduler(sampler)
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            prediction = denoise(model_input, t.expand(x.shape[0]))
            x = scheduler.step(prediction, t, x, generator=generator).prev_sample
        return x
