import pytest
import torch
from diffusers import DDPMScheduler

from lit_dimba.diffusion.gaussian import GaussianDiffusion, Noised


def test_schedule_and_targets_match_diffusers():
    diffusion = GaussianDiffusion(prediction_type="v_prediction")
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    torch.testing.assert_close(diffusion.target(x0, noise, t), reference.get_velocity(x0, noise, t))
    assert torch.equal(GaussianDiffusion().target(x0, noise, t), noise)
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_target(prediction_type):
    diffusion = GaussianDiffusion(prediction_type=prediction_type)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([5, 300, 900])
    x_t = diffusion.add_noise(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0(x_t, diffusion.target(x0, noise, t), t), x0, atol=1e-4, rtol=1e-4)


def test_learned_sigma_loss():
    """The variance bound is ~0 for a perfect mean with the true posterior variance, positive otherwise,
    and trains only the variance channels."""
    diffusion = GaussianDiffusion()
    x0, noise = torch.randn(4, 3, 8, 8).clamp(-1, 1), torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 50, 400, 999])
    x_t = diffusion.add_noise(x0, noise, t)
    perfect = torch.cat([noise, -torch.ones_like(noise)], 1)  # frac 0 -> posterior log-variance
    losses = diffusion.training_losses(perfect, Noised(x0, noise, t, x_t))
    assert set(losses) == {"mse", "vb", "loss"}
    assert losses["vb"].abs().max() < 1e-4 and losses["mse"].max() < 1e-12
    t = torch.tensor([0, 1, 5, 20])  # where the posterior variance is far below beta_t
    x_t = diffusion.add_noise(x0, noise, t)
    wrong = torch.cat([noise, torch.ones_like(noise)], 1).requires_grad_()
    out = diffusion.training_losses(wrong, Noised(x0, noise, t, x_t))
    assert (out["vb"] > 1e-3).all()
    out["vb"].sum().backward()
    assert wrong.grad[:, :3].abs().max() == 0 and wrong.grad[:, 3:].abs().max() > 0
    with pytest.raises(ValueError, match="expected 3 or 6"):
        diffusion.training_losses(torch.randn(4, 5, 8, 8), Noised(x0, noise, t, x_t))


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "euler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_recover_a_point_distribution(sampler, prediction_type):
    """With the exact denoiser of a one-point data set, every sampler lands on that point."""
    diffusion = GaussianDiffusion(prediction_type=prediction_type)
    target = torch.rand(2, 3, 4, 4) * 2 - 1

    def oracle(x_t, t):
        a = diffusion.alphas_cumprod[t.round().long()].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * target) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * target

    out = diffusion.sample(oracle, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), sampler, steps=10)
    torch.testing.assert_close(out, target, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.make_scheduler("plms")


def test_noise_draws_timesteps_then_noise_from_the_generator():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(64, 3, 4, 4)
    noised = diffusion.noise(x0, torch.Generator().manual_seed(5))
    again = diffusion.noise(x0, torch.Generator().manual_seed(5))
    assert torch.equal(noised.t, again.t) and torch.equal(noised.noise, again.noise), "a function of the generator"
    generator = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (64,), generator=generator)
    assert torch.equal(noised.t, t) and torch.equal(noised.noise, torch.randn(x0.shape, generator=generator))
    assert noised.x0 is x0 and len(set(noised.t.tolist())) > 32
    torch.testing.assert_close(noised.x_t, diffusion.add_noise(x0, noised.noise, noised.t), rtol=0, atol=0)
