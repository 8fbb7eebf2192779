"""VQGAN's adversarial training terms: hinge losses, the adaptive generator weight, the discriminator start step,
and an optional perceptual loss that is only ever built from weights the user has on disk.

Paper: Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", https://arxiv.org/abs/2012.09841
(eq. 7: lambda = ||grad_L(rec)|| / (||grad_L(gan)|| + delta), gradients at the decoder's last layer).

The one idea to hold: before ``disc_start`` the generator trains on reconstruction alone and the discriminator
is not run at all; after it, the GAN term is scaled so that its gradient at the decoder's last layer has the same
size as the reconstruction gradient (times ``disc_weight``), which keeps a young GAN from wrecking the autoencoder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GANLossConfig:
    """enabled: train with a discriminator at all; disc_start: first step where the GAN terms are on;
    adaptive_weight: taming's gradient-ratio weight (else a constant ``disc_weight``); perceptual_weights: path of a
    TorchScript feature network (images in [-1, 1] -> feature map or list of maps); None means perceptual loss off."""

    enabled: bool = False
    disc_start: int = 0
    disc_weight: float = 0.8
    adaptive_weight: bool = True
    disc_lr_scale: float = 1.0
    ndf: int = 32
    n_layers: int = 2
    perceptual_weights: str | None = None
    perceptual_weight: float = 1.0

    def describe(self) -> str:
        if not self.enabled:
            return "GAN: off; perceptual loss: off"
        gan = (f"GAN: on from step {self.disc_start} (hinge, "
               f"{'adaptive weight x' if self.adaptive_weight else 'constant weight '}{self.disc_weight})")
        perc = (f"perceptual loss: on ({self.perceptual_weights}, weight {self.perceptual_weight})"
                if self.perceptual_weights else "perceptual loss: off (no local weights given)")
        return f"{gan}; {perc}"


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float) -> Tensor:
    """disc_weight * clamp(||d rec / d W|| / (||d g / d W|| + 1e-4), 0, 1e4), detached (W = decoder's last layer)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return (weight.clamp(0.0, 1e4) * disc_weight).detach()


class PerceptualLoss(nn.Module):
    """Mean squared distance between unit-normalised features of a user-supplied TorchScript network (frozen).

    quantkit ships no pretrained weights and downloads none: give the path of e.g. a scripted VGG/LPIPS trunk.
    """

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"perceptual loss weights {path!r} not found; give a local TorchScript file or "
                                    f"leave perceptual_weights unset (perceptual loss off)")
        try:
            self.net = torch.jit.load(path, map_location="cpu").eval()
        except Exception as err:
            raise ValueError(f"perceptual loss weights {path!r} are not a TorchScript module ({err}); save one "
                             f"with torch.jit.script(net).save(path)") from err
        for p in self.net.parameters():  # ScriptModules have no requires_grad_()
            p.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grey images: feature networks expect RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx, fy = self.net(x), self.net(y)
        fx, fy = ([fx], [fy]) if isinstance(fx, Tensor) else (fx, fy)
        total = x.new_zeros(())
        for a, b in zip(fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean()
        return total


__all__ = ["GANLossConfig", "PerceptualLoss", "adaptive_weight", "hinge_d_loss", "hinge_g_loss"]
