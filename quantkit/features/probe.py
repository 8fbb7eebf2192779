"""Linear-probe evaluation of a patch feature encoder on ``digits``, against raw pixels.

"Pretrained" features are measured, not assumed: a multinomial logistic regression is fitted on the features of
the digits train split and scored on the test split (MAE paper, section 4: linear probing), beside the same probe
on the raw pixels. Two readouts of the patch features (B, N, F): ``mean`` (average over patches, F numbers, the
usual ViT readout) and ``flat`` (all N x F numbers, which keeps where each feature is). Features are standardized
with the train split's statistics; the L2 strength is picked from a small grid by 3-fold cross-validation on the
train split alone, the same way for every representation.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import load_dataset, stack_batch
from .encoder import FeatureEncoder

__all__ = ["encode_dataset", "linear_probe", "probe_report"]

#: Inverse L2 strengths tried by cross-validation (sklearn's C).
PROBE_CS = (0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def encode_dataset(encoder: FeatureEncoder, dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Every image of a map-style dataset -> (features (M, N, F) float32, labels (M,) int64)."""
    feats, labels = [], []
    for start in range(0, len(dataset), batch_size):
        images, y = stack_batch(dataset, range(start, min(start + batch_size, len(dataset))))
        feats.append(encoder(images))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, seed: int = 0) -> dict[str, float]:
    """Test accuracy of a logistic-regression probe on (M, D) features; also the C it picked."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"linear_probe: {name} must be a (M, D) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear_probe: train_x has {train_x.shape[1]} columns, test_x {test_x.shape[1]}")
    scaler = StandardScaler().fit(train_x.double().numpy())
    xtr, xte = scaler.transform(train_x.double().numpy()), scaler.transform(test_x.double().numpy())
    clf = LogisticRegressionCV(Cs=list(PROBE_CS), cv=3, max_iter=3000, random_state=seed, scoring="accuracy")
    with warnings.catch_warnings():  # sklearn's notices about its own future defaults
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(xtr, train_y.numpy())
    accuracy = float(np.mean(clf.predict(xte) == test_y.numpy()))
    return {"accuracy": accuracy, "C": float(np.atleast_1d(clf.C_)[0]), "dims": int(train_x.shape[1])}


def probe_report(encoder: FeatureEncoder, image_size: int | None = None) -> dict[str, Any]:
    """Linear-probe test accuracy on digits: raw pixels, and the encoder's patch features (mean and flat)."""
    c, h, w = encoder.image_shape
    if c != 1 or h != w or (image_size is not None and image_size != h):
        raise ValueError(f"probe_report: the digits probe needs an encoder of (1, S, S) images, this one reads "
                         f"{encoder.image_shape}")
    train, test = load_dataset("digits", "train", h), load_dataset("digits", "test", h)
    (ftr, ytr), (fte, yte) = encode_dataset(encoder, train), encode_dataset(encoder, test)
    raw_tr, raw_te = stack_batch(train, range(len(train)))[0], stack_batch(test, range(len(test)))[0]
    return {
        "raw_pixels": linear_probe(raw_tr.flatten(1), ytr, raw_te.flatten(1), yte),
        "features_mean": linear_probe(ftr.mean(1), ytr, fte.mean(1), yte),
        "features_flat": linear_probe(ftr.flatten(1), ytr, fte.flatten(1), yte),
        "train_images": len(train), "test_images": len(test),
        "num_patches": encoder.num_patches, "feature_dim": encoder.feature_dim,
    }
