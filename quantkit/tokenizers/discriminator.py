"""PatchGAN discriminator (pix2pix's NLayerDiscriminator), as used to train VQGAN.

Paper: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", https://arxiv.org/abs/1611.07004

The one idea to hold: the discriminator outputs one real/fake logit per overlapping patch (a (B, 1, h, w) map),
so it judges local texture, which is what an L1 loss cannot sharpen.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class DiscriminatorConfig:
    channels: int = 3
    ndf: int = 32
    n_layers: int = 2


class PatchDiscriminator(nn.Module):
    """conv4x4 s2 + LeakyReLU, then (n_layers - 1) conv4x4 s2 + BatchNorm + LeakyReLU, one s1 layer, a 1-channel conv.

    (B, C, H, W) -> logits (B, 1, ~H / 2^n_layers, ~W / 2^n_layers). Weights start at N(0, 0.02) as in taming.
    """

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        c = config or DiscriminatorConfig()
        layers: list[nn.Module] = [nn.Conv2d(c.channels, c.ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, c.n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < c.n_layers else 1
            layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c.ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(c.ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


__all__ = ["DiscriminatorConfig", "PatchDiscriminator"]
