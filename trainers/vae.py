"""Training the KL autoencoder itself: L1 reconstruction plus a small KL term (no discriminator).

This is how the tiny world gets its VAE; it runs on the same loop as every other method, reading
pictures instead of the latent cache (which needs a finished VAE). The export is a complete model
folder whose VAE config carries a `scaling_factor` measured on the training pictures, so the
latents a U-Net later trains on have unit variance, as SD's 0.18215 was chosen for its VAE; a VAE
with a `shift_factor` (SD3 / Flux) gets its measured mean there too, so they are also centred.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .method import Method

SCALE_SAMPLE = 512  # pictures the scaling factor is measured on


class VaeMethod(Method):
    name = "vae"

    def build(self) -> None:
        self.components.vae.requires_grad_(True)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.components.vae}

    def dataset(self, device, progress):
        from data_tools.pixels import PixelDataset

        if self.config.validation.heldout:
            raise ValueError("validation.heldout measures the denoising loss; set it to 0 for method: vae")
        self.pictures = PixelDataset(self.config.data, progress=progress)
        return self.pictures, self.pictures.keys

    def loss(self, models, batch, empty_text, generators):
        vae, config = models["vae"], self.components.vae.config
        x = batch["pixels"]  # (b, 3, H, W) in [-1, 1]
        factor = 2 ** (len(config.block_out_channels) - 1)
        shape = (config.latent_channels, x.shape[2] // factor, x.shape[3] // factor)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(x.device)
        recon, posterior = vae(x, noise=noise)  # through the prepared module: gradients sync across ranks
        recon = recon.float()
        vc = self.config.vae
        loss = F.l1_loss(recon, x)
        if vc.l2_weight:
            loss = loss + vc.l2_weight * F.mse_loss(recon, x)
        # the KL is summed over latent elements but the L1 is a mean over pixels: per pixel, as in the
        # LDM autoencoders' summed likelihood, so that kl_weight means what it means there (1e-6)
        return loss + vc.kl_weight * posterior.kl().float().mean() / x[0].numel()

    @torch.no_grad()
    def measured_factors(self) -> tuple[float, float]:
        """(mean, 1 / standard deviation) of posterior samples over (up to) SCALE_SAMPLE training pictures."""
        vae = self.components.vae
        was_training = vae.training
        vae.eval()
        g = torch.Generator().manual_seed(0)
        first, second, count = 0.0, 0.0, 0
        for start in range(0, min(len(self.pictures), SCALE_SAMPLE), 64):
            x = torch.stack([self.pictures[i]["pixels"] for i in range(start, min(start + 64, len(self.pictures)))])
            z = vae.encode(x.to(vae.device, vae.dtype)).sample(g).double()
            first, second, count = first + z.sum().item(), second + z.pow(2).sum().item(), count + z.numel()
        vae.train(was_training)
        mean = first / count
        return float(mean), float(1.0 / max(second / count - mean ** 2, 1e-12) ** 0.5)

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        """A complete model folder (diffusers layout) with the trained VAE in float32."""
        parts = self.components
        mean, scale = self.measured_factors()
        shift = {} if parts.vae.config.shift_factor is None else {"shift_factor": mean}  # centred where the VAE shifts
        parts.vae.config = dataclasses.replace(parts.vae.config, scaling_factor=scale, **shift)
        target = folder / "model"
        dtypes = {m: next(m.parameters()).dtype for m in (parts.denoiser, *parts.text_encoders.values())}
        for m in dtypes:  # the frozen parts may sit in low precision during training
            m.to(torch.float32)
        parts.save_pretrained(target)
        for m, dtype in dtypes.items():
            m.to(dtype)
        return [target]
