"""Built-in image data for tokenizers and generators; nothing is ever downloaded.

Datasets
    digits   the 1,797 handwritten 8x8 digits bundled with scikit-learn (``load_digits``), bilinearly resized to
             ``image_size`` (16 by default), 1 channel, with labels and a fixed stratified train/test split.
    patches  random ``image_size`` RGB crops (with horizontal flips) from photographs bundled with scikit-image
             and scikit-learn; whole photos are held out for the test split, so evaluation sees unseen images.
    folder   every image in a folder a user points at (crop/resize to ``image_size``), label 0.

The one idea to hold: every dataset is map-style and deterministic. ``dataset[i]`` is always the same
``(image (C, H, W) float32 in [0, 1], label int)``, also for random crops (item i's crop is drawn from a generator
seeded by (seed, i)). Training randomness therefore lives only in which indices a step draws, which is what makes
an exact resume possible. Tokenizers map [0, 1] to their own ``pixel_range``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DATASETS", "DigitsDataset", "ImageFolderDataset", "PatchesDataset", "load_dataset", "stack_batch"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Photos bundled inside the scikit-image wheel (read from disk directly, never through skimage's fetcher, so no
# network access can happen) and scikit-learn's two sample images. Grey photos are repeated to 3 channels.
_SKIMAGE_TRAIN = ("astronaut.png", "chelsea.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
                  "retina.jpg", "rocket.jpg", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png")
_SKIMAGE_TEST = ("coffee.png", "camera.png")
_SKLEARN_TRAIN = ("china.jpg",)
_SKLEARN_TEST = ("flower.jpg",)


# ----------------------------------------------------------------------------------------------------------------
# digits


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits, (1, S, S) in [0, 1] with labels 0-9.

    The split is fixed: a stratified 80/20 split with seed 0 (1,437 train / 360 test images).
    """

    num_classes = 10

    def __init__(self, split: str = "train", image_size: int = 16):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        _check_split(split)
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
        labels = torch.from_numpy(digits.target.astype(np.int64))
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                               stratify=digits.target)
        idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
        images = images[idx]
        if image_size != 8:
            images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                     align_corners=False).clamp_(0, 1)
        self.images, self.labels = images.contiguous(), labels[idx]
        self.image_size, self.channels = image_size, 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


# ----------------------------------------------------------------------------------------------------------------
# patches of bundled photographs


def _bundled_photo_paths(split: str) -> list[Path]:
    import skimage
    import sklearn.datasets

    skimage_dir = Path(skimage.__file__).parent / "data"
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    names = ((_SKIMAGE_TRAIN, _SKLEARN_TRAIN) if split == "train" else (_SKIMAGE_TEST, _SKLEARN_TEST))
    paths = [skimage_dir / n for n in names[0]] + [sklearn_dir / n for n in names[1]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"patches: bundled photos are missing from the installed scikit-image / scikit-learn: "
                                f"{missing}; reinstall them (quantkit never downloads data)")
    return paths


class PatchesDataset(Dataset):
    """Random RGB crops with horizontal flips from bundled photographs, (3, S, S) in [0, 1], label = photo index.

    Train photos: 12 from scikit-image plus china.jpg; test photos (never trained on): coffee, camera (grey) and
    flower.jpg. ``length`` is the number of distinct crops; item i is the same crop on every call.
    """

    def __init__(self, split: str = "train", image_size: int = 32, length: int | None = None, seed: int = 0):
        _check_split(split)
        self.photos = [_read_image(p, channels=3) for p in _bundled_photo_paths(split)]  # each (3, H, W) uint8
        for p, photo in zip(_bundled_photo_paths(split), self.photos):
            if min(photo.shape[1:]) < image_size:
                raise ValueError(f"patches: image_size {image_size} is larger than photo {p.name} {photo.shape[1:]}")
        self.image_size, self.channels, self.seed = image_size, 3, seed
        self.length = length if length is not None else (100_000 if split == "train" else 1_024)
        # test crops use another seed stream so that no crop coincides with a train crop by construction
        self._stream = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(f"patches: index {i} out of range [0, {self.length})")
        rng = np.random.default_rng((self.seed, self._stream, i))
        k = int(rng.integers(len(self.photos)))
        photo = self.photos[k]
        s = self.image_size
        top = int(rng.integers(photo.shape[1] - s + 1))
        left = int(rng.integers(photo.shape[2] - s + 1))
        crop = photo[:, top:top + s, left:left + s]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop.float().div_(255.0), k


# ----------------------------------------------------------------------------------------------------------------
# a user's folder


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursively), centre-cropped to a square and resized to ``image_size``.

    Corrupt files are found when the dataset is built (each file is opened and verified once), not mid-training.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 32, channels: int = 3):
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
        self.paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"image folder {str(root)!r} contains no images (looked for {', '.join(IMAGE_SUFFIXES)});"
                             f" point --data at a folder with image files")
        for p in self.paths:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as err:  # PIL raises many types for broken files
                raise ValueError(f"image folder: {str(p)!r} is not a readable image ({err}); remove or replace it")
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = _read_image(self.paths[i], channels=self.channels)  # (C, H, W) uint8
        side = min(img.shape[1:])
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        img = img[:, top:top + side, left:left + side].float().div_(255.0)[None]
        img = torch.nn.functional.interpolate(img, size=(self.image_size, self.image_size), mode="bilinear",
                                              antialias=True, align_corners=False)
        return img[0].clamp_(0, 1), 0


# ----------------------------------------------------------------------------------------------------------------
# entry points


@dataclass(frozen=True)
class _Spec:
    default_image_size: int
    channels: int


DATASETS = {"digits": _Spec(16, 1), "patches": _Spec(32, 3)}


def load_dataset(name: str | os.PathLike, split: str = "train", image_size: int | None = None,
                 seed: int = 0) -> Dataset:
    """A built-in dataset by name (``digits``, ``patches``) or an image folder by path."""
    key = str(name)
    if key == "digits":
        return DigitsDataset(split, image_size or DATASETS["digits"].default_image_size)
    if key == "patches":
        return PatchesDataset(split, image_size or DATASETS["patches"].default_image_size, seed=seed)
    if os.path.isdir(key):
        return ImageFolderDataset(key, image_size or 32)
    raise ValueError(f"unknown dataset {key!r}: use one of {sorted(DATASETS)} or the path of an image folder")


def dataset_channels(dataset: Dataset) -> int:
    """Channels of the images of a dataset (attribute ``channels`` when present, else read from item 0)."""
    channels = getattr(dataset, "channels", None)
    return int(channels) if channels is not None else int(dataset[0][0].shape[0])


def stack_batch(dataset: Dataset, indices) -> tuple[Tensor, Tensor]:
    """Items ``indices`` of a map-style dataset -> (images (B, C, H, W) float32, labels (B,) int64).

    Items may be ``image`` or ``(image, label)``; images must be float tensors in [0, 1] of one shape.
    """
    images, labels = [], []
    for i in indices:
        item = dataset[int(i)]
        image, label = (item if isinstance(item, (tuple, list)) else (item, 0))[:2]
        image = torch.as_tensor(image)
        if not image.is_floating_point() or image.dim() != 3:
            raise ValueError(f"dataset item {int(i)}: expected a float image tensor (C, H, W) in [0, 1], got "
                             f"{image.dtype} of shape {tuple(image.shape)}")
        images.append(image.float())
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _read_image(path: Path, channels: int) -> Tensor:
    """(C, H, W) uint8 tensor of an image file (grey repeated to 3 channels, RGB averaged to 1 when asked)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
