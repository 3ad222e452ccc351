"""Frozen image autoencoders that map images to the space the diffusion model works in."""

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from lit_dimba.conditioning.frozen import FrozenModule, check_local_path
from lit_dimba.conditioning.text import parse_dtype


class LatentVAE(FrozenModule):
    """
    Frozen KL autoencoder (Stable Diffusion VAE by default, as in PixArt-alpha).

    Latents are scaled as ``(z - shift_factor) * scaling_factor`` with the factors read from the model config,
    so that they have roughly unit variance.
    """

    def __init__(
        self,
        pretrained: str | None = "stabilityai/sd-vae-ft-ema",
        subfolder: str | None = None,
        config: dict | None = None,
        dtype: str = "float32",
        sample_posterior: bool = False,
    ):
        """
        :param pretrained: Hugging Face hub id or local folder of an AutoencoderKL; None to build from ``config``.
        :param subfolder: folder inside ``pretrained`` holding the VAE (``"vae"`` for a full pipeline repo).
        :param config: AutoencoderKL config for a freshly initialised model (tests); requires pretrained=None.
        :param dtype: dtype of the VAE weights; inputs and outputs of encode/decode are float32.
        :param sample_posterior: encode to a sample of the posterior instead of its mean.
        """
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError("Pass exactly one of pretrained and config (set pretrained=None to build from config)")
        torch_dtype = parse_dtype(dtype)
        if config is not None:
            self.vae = AutoencoderKL.from_config(config)
            if torch_dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
                self.vae.to(torch_dtype)
        else:
            hint = (
                "Pass a Hugging Face hub id (e.g. 'stabilityai/sd-vae-ft-ema') or a local folder containing "
                "config.json and the AutoencoderKL weights (use subfolder='vae' for a full pipeline)."
            )
            check_local_path(pretrained, hint)
            try:
                self.vae = AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=torch_dtype)
            except (OSError, ValueError, KeyError) as err:
                raise OSError(f"Could not load a VAE from pretrained={pretrained!r}: {err}\n{hint}") from err
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift_factor = getattr(self.vae.config, "shift_factor", None)
        self.shift_factor = 0.0 if shift_factor is None else float(shift_factor)
        self.sample_posterior = sample_posterior
        self.freeze()

    @property
    def latent_channels(self) -> int:
        """Number of latent channels C."""
        return self.vae.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling factor f between images and latents."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """
        :param images: [B, 3, H, W] in [-1, 1], H and W divisible by ``downsample_factor``.
        :param generator: draws the posterior sample (``sample_posterior``); None: the global generator.
        :return: scaled latents [B, C, H / f, W / f] float32: ``posterior_latents`` of ``encode_distribution``.
        """
        return self.posterior_latents(*self.encode_distribution(images), generator)

    @torch.no_grad()
    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """
        The scaled Gaussian posterior of the latents (what the feature cache stores).

        :param images: [B, 3, H, W] in [-1, 1], H and W divisible by ``downsample_factor``.
        :return: mean ``(mean_z - shift_factor) * scaling_factor`` and std ``std_z * scaling_factor``, both
            [B, C, H / f, W / f] float32.
        """
        height, width = images.shape[-2:]
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"Image resolution {height}x{width} is not divisible by the VAE downsample factor {f}")
        posterior = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        return mean, posterior.std.float() * self.scaling_factor

    def posterior_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """
        The latents training uses for a scaled posterior: a fresh draw ``mean + std * N(0, 1)`` if
        ``sample_posterior``, else the mean.

        :param mean, std: [B, C, h, w], as returned by ``encode_distribution``.
        :param generator: draws the sample; None: the global generator.
        :return: [B, C, h, w] in the dtype of ``mean``.
        """
        if not self.sample_posterior:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """
        :param latents: scaled latents [B, C, h, w], as returned by ``encode``.
        :return: images [B, 3, h * f, w * f] float32, roughly in [-1, 1].
        """
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample.float()


class PixelSpace(FrozenModule):
    """Identity autoencoder, so the same diffusion code can run directly on pixels."""

    latent_channels = 3
    downsample_factor = 1

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:param images: [B, 3, H, W] in [-1, 1]. :return: the same images as float32 (nothing is drawn)."""
        return images.float()

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """:param images: [B, 3, H, W]. :return: mean (the images as float32) and std (zeros), both [B, 3, H, W]."""
        mean = images.float()
        return mean, torch.zeros_like(mean)

    def posterior_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """:param mean, std: [B, 3, H, W] from ``encode_distribution``. :return: ``mean`` (pixels are exact)."""
        return mean

    def decode(self, latents: Tensor) -> Tensor:
        """:param latents: [B, 3, H, W]. :return: the same tensor as float32."""
        return latents.float()
