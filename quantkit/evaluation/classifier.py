"""A small digit classifier trained by quantkit on the real ``digits`` train split: the judge of generated digits.

It gives two things: a label for each generated image (conditional accuracy: does the sample show the class that
was asked for?) and a 64-d feature vector (the penultimate layer) whose Gaussian statistics define a Frechet
distance between two sets of images - the FID recipe (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) with a
classifier that knows digits instead of Inception.

The one idea to hold: the classifier never sees generated images in training, only real train digits (with small
random shifts), and its test accuracy on real test digits is reported next to every number it produces.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ClassifierConfig:
    image_size: int = 16
    channels: int = 1
    num_classes: int = 10
    width: int = 16
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


class DigitClassifier(nn.Module):
    """conv-pool-conv-pool -> 64-d features -> 10 logits. Images (B, 1, S, S) in [0, 1]."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.features_layer = nn.Linear(2 * w * (cfg.image_size // 4) ** 2, cfg.feature_dim)
        self.out = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """(B, C, S, S) in [0, 1] -> (B, feature_dim), before the last non-linearity."""
        return self.features_layer(self.body(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.out(F.relu(self.features(images)))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """-> (labels (B,) int64, features (B, feature_dim) float64), in eval mode."""
        was = self.training
        self.eval()
        labels, feats = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk.float())
            labels.append(self.out(F.relu(f)).argmax(-1))
            feats.append(f.double())
        self.train(was)
        return torch.cat(labels), torch.cat(feats)


def _random_shift(images: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shifts the batch by one random offset of up to ``max_shift`` pixels in each direction (zero fill)."""
    S = images.shape[-1]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return F.pad(images, (max_shift,) * 4)[..., dy:dy + S, dx:dx + S]


def train_digit_classifier(cfg: ClassifierConfig | None = None, verbose: bool = False
                           ) -> tuple[DigitClassifier, float]:
    """Trains on the real digits train split; returns (classifier in eval mode, test accuracy on the test split)."""
    from ..data import DigitsDataset

    cfg = cfg or ClassifierConfig()
    train, test = DigitsDataset("train", cfg.image_size), DigitsDataset("test", cfg.image_size)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DigitClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        for idx in order.split(cfg.batch_size):
            x = _random_shift(train.images[idx], gen)
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"classifier epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}")
    model.eval()
    pred, _ = model.predict(test.images)
    return model, float((pred == test.labels).float().mean())


def load_or_train_classifier(path: str | os.PathLike | None = None, cfg: ClassifierConfig | None = None
                             ) -> tuple[DigitClassifier, float]:
    """The classifier cached at ``path`` (a folder: weights + JSON with its config and test accuracy), trained and
    written there first when absent or built with another config."""
    cfg = cfg or ClassifierConfig()
    if path is not None:
        folder = Path(path)
        meta_path, weights_path = folder / "classifier.json", folder / "classifier.pt"
        if meta_path.is_file() and weights_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("config") == asdict(cfg):
                model = DigitClassifier(cfg)
                model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
                return model.eval(), float(meta["test_accuracy"])
    model, acc = train_digit_classifier(cfg)
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = weights_path.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, weights_path)
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": asdict(cfg), "test_accuracy": acc}, indent=2))
        os.replace(tmp, meta_path)
    return model, acc


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed in float64.

    tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real and >= 0 for two PSD
    matrices; tiny negative round-off is clipped), which avoids an explicit matrix square root.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: need two (N, D) feature sets with the same D, got {a.shape}, {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("frechet_distance: need at least two samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
