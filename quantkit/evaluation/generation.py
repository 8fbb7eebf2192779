"""Generator evaluation on ``digits``: conditional accuracy, Frechet distance in the digit classifier's feature
space (against real test digits, with tokenizer reconstructions as the floor), images per second and network
evaluations per image.

The one idea to hold: every Frechet distance compares sets of the *same size and class mix* as the test split -
samples are drawn for exactly the test labels, and the floor reconstructs a class-matched subset of the *train*
digits - because the finite-sample bias of a Frechet distance depends on the set size. The floor is therefore
what a generator that had learned the training tokens perfectly would score (reconstruction error + sampling
noise); the reconstructions of the test digits themselves are reported too, as a tighter, paired reference.

At this set size (360) one Frechet distance is noisy: two sample sets of the same generator differ by up to 40%.
So both sides are averaged over several draws - the floor over ``draws`` class-matched train subsets, a generator
over ``draws`` sample sets (seeds ``seed .. seed + draws - 1``) - and the spread across draws is reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..generators.sampling import SamplingConfig, make_generator
from .classifier import DigitClassifier, frechet_distance


@dataclass
class ReferenceSets:
    """Real test digits, their labels, and the classifier features of the reference sets, computed once."""

    test_images: Tensor  # (N, 1, S, S) in [0, 1]
    test_labels: Tensor  # (N,)
    test_features: Tensor  # (N, D) float64
    floor_fd: float  # reconstructions of a class-matched train subset vs test (mean over draws)
    recon_test_fd: float  # reconstructions of the test digits themselves vs test (paired, tighter)
    real_train_fd: float  # real class-matched train subset vs test (data noise alone; mean over draws)
    recon_accuracy: float  # classifier accuracy on the test reconstructions
    floor_fd_std: float = 0.0  # spread of the floor over the train subsets (0 for one draw)


def _check_draws(fn: str, draws: int) -> None:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"{fn}: draws must be a positive int, got {draws!r}")


def class_matched_subset(labels: Tensor, like: Tensor, seed: int = 0) -> Tensor:
    """Indices into ``labels`` with exactly as many items of each class as ``like`` has (random, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in like.unique():
        pool = (labels == c).nonzero().squeeze(1)
        need = int((like == c).sum())
        if need > len(pool):
            raise ValueError(f"class {int(c)}: need {need} items but only {len(pool)} exist")
        picks.append(pool[torch.randperm(len(pool), generator=gen)[:need]])
    return torch.cat(picks).sort().values


@torch.no_grad()
def reconstruct(tokenizer, images01: Tensor, batch_size: int = 256) -> Tensor:
    """[0, 1] images -> tokenizer reconstructions in [0, 1]."""
    out = []
    for chunk in images01.split(batch_size):
        ids = tokenizer.encode(tokenizer.from_unit(chunk))
        out.append(tokenizer.to_unit(tokenizer.decode(ids)).clamp(0, 1))
    return torch.cat(out)


def reference_sets(tokenizer, classifier: DigitClassifier, image_size: int = 16, seed: int = 0, draws: int = 4
                   ) -> ReferenceSets:
    """The test features and the reference distances; floor and real-train FDs average ``draws`` train subsets."""
    from ..data import DigitsDataset

    _check_draws("reference_sets", draws)
    train, test = DigitsDataset("train", image_size), DigitsDataset("test", image_size)
    _, test_feats = classifier.predict(test.images)
    _, train_recon_feats = classifier.predict(reconstruct(tokenizer, train.images))
    _, train_feats = classifier.predict(train.images)
    floors, reals = [], []
    for draw in range(draws):
        subset = class_matched_subset(train.labels, test.labels, seed + draw)
        floors.append(frechet_distance(train_recon_feats[subset], test_feats))
        reals.append(frechet_distance(train_feats[subset], test_feats))
    recon_pred, recon_feats = classifier.predict(reconstruct(tokenizer, test.images))
    return ReferenceSets(
        test_images=test.images, test_labels=test.labels, test_features=test_feats,
        floor_fd=statistics.fmean(floors),
        recon_test_fd=frechet_distance(recon_feats, test_feats),
        real_train_fd=statistics.fmean(reals),
        recon_accuracy=float((recon_pred == test.labels).float().mean()),
        floor_fd_std=statistics.pstdev(floors),
    )


@torch.no_grad()
def sample_images(generator_model, tokenizer, labels: Tensor, steps: int | None = None,
                  sampling: SamplingConfig | None = None, seed: int = 0, batch_size: int = 128
                  ) -> tuple[Tensor, Tensor, float]:
    """Samples one image per label. -> (images in [0, 1] (B, C, H, W), token ids, seconds spent in the generator
    alone (decoding by the tokenizer is not timed))."""
    generator_model.eval()
    gen = make_generator(seed, generator_model.device)
    ids_all, images, seconds = [], [], 0.0
    for chunk in labels.split(batch_size):
        t0 = time.perf_counter()
        ids = generator_model.generate(chunk, steps=steps, sampling=sampling, generator=gen)
        seconds += time.perf_counter() - t0
        ids_all.append(ids)
        images.append(tokenizer.to_unit(tokenizer.decode(ids.to(next(tokenizer.parameters()).device))).clamp(0, 1))
    return torch.cat(images).cpu(), torch.cat(ids_all).cpu(), seconds


def evaluate_generator(generator_model, tokenizer, classifier: DigitClassifier, refs: ReferenceSets,
                       steps: int | None = None, sampling: SamplingConfig | None = None, seed: int = 0,
                       batch_size: int = 128, draws: int = 4) -> dict:
    """Samples the test split's labels ``draws`` times (seeds ``seed``, ``seed + 1``, ...) and scores each set.

    Returns a flat dict of numbers (JSON-ready): accuracy and Frechet distance are means over the draws;
    ``frechet_distance_std`` is their spread; images per second counts every draw.
    """
    _check_draws("evaluate_generator", draws)
    sampling = sampling or SamplingConfig()
    fds, accuracies, seconds = [], [], 0.0
    for draw in range(draws):
        images, _, spent = sample_images(generator_model, tokenizer, refs.test_labels, steps, sampling, seed + draw,
                                         batch_size)
        pred, feats = classifier.predict(images)
        fds.append(frechet_distance(feats, refs.test_features))
        accuracies.append(float((pred == refs.test_labels).float().mean()))
        seconds += spent
    fd = statistics.fmean(fds)
    return {
        "generator": generator_model.registry_name,
        "parameters": generator_model.num_parameters(),
        "steps": steps,
        "guidance": sampling.guidance,
        "temperature": sampling.temperature,
        "samples": len(refs.test_labels),
        "draws": draws,
        "conditional_accuracy": statistics.fmean(accuracies),
        "frechet_distance": fd,
        "frechet_distance_std": statistics.pstdev(fds),
        "floor_frechet_distance": refs.floor_fd,
        "fd_over_floor": fd / refs.floor_fd if refs.floor_fd > 0 else float("inf"),
        "images_per_second": draws * len(refs.test_labels) / seconds,
        "evaluations_per_image": generator_model.evaluations_per_image(steps, sampling.guidance),
    }


def best_rows(rows: list[dict], min_accuracy: float = 0.9) -> dict[str, dict]:
    """Per generator, the :func:`evaluate_generator` row with the lowest FD / floor among those whose conditional
    accuracy is at least ``min_accuracy`` (the lowest FD / floor overall when none qualifies). Generators keep the
    order of their first row."""
    if not rows:
        raise ValueError("best_rows: no evaluation rows given")
    best = {}
    for name in dict.fromkeys(r["generator"] for r in rows):
        mine = [r for r in rows if r["generator"] == name]
        ok = [r for r in mine if r["conditional_accuracy"] >= min_accuracy] or mine
        best[name] = min(ok, key=lambda r: r["fd_over_floor"])
    return best
