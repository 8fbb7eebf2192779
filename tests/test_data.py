"""Built-in data: fixed splits, determinism, held-out photos, no network, clear errors for bad folders."""
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from quantkit.data import (DigitsDataset, ImageFolderDataset, PatchesDataset, _bundled_photo_paths, load_dataset,
                           stack_batch)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("quantkit.data tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_split_is_fixed_disjoint_and_labelled(no_network):
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    x, y = train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int) and set(test.labels.tolist()) == set(range(10))
    assert torch.equal(DigitsDataset("train").images, train.images)  # same split every time
    flat_train = {tuple(v.flatten().tolist()) for v in train.images}
    assert not any(tuple(v.flatten().tolist()) in flat_train for v in test.images[:50])
    assert DigitsDataset("train", image_size=32)[0][0].shape == (1, 32, 32)


def test_patches_are_deterministic_rgb_crops_and_test_photos_are_held_out(no_network):
    train = PatchesDataset("train", image_size=32, length=64)
    x, k = train[5]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(train[5][0], x)  # item i is always the same crop
    assert not torch.equal(train[6][0], x)
    train_names = {p.name for p in _bundled_photo_paths("train")}
    test_names = {p.name for p in _bundled_photo_paths("test")}
    assert train_names.isdisjoint(test_names) and len(test_names) >= 2
    with pytest.raises(IndexError):
        train[64]


def test_folder_dataset_reads_resizes_and_rejects_empty_or_corrupt(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray((np.random.rand(40, 30, 3) * 255).astype(np.uint8)).save(tmp_path / "a" / "one.png")
    Image.fromarray((np.random.rand(20, 20) * 255).astype(np.uint8)).save(tmp_path / "two.jpg")
    ds = load_dataset(tmp_path, image_size=8)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 2
    assert ds[0][0].shape == (3, 8, 8) and ds[1][0].shape == (3, 8, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(empty)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png.*not a readable image"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")


def test_unknown_dataset_and_bad_items_are_explained():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be"):
        DigitsDataset("val")
    with pytest.raises(ValueError, match="expected a float image"):
        stack_batch([torch.zeros(4, 4, dtype=torch.uint8)], [0])


def test_any_map_style_dataset_stacks():
    items = [(torch.rand(1, 4, 4), i) for i in range(3)]
    images, labels = stack_batch(items, [2, 0])
    assert images.shape == (2, 1, 4, 4) and labels.tolist() == [2, 0]
    images, labels = stack_batch([torch.rand(1, 4, 4)], [0])  # images without labels get label 0
    assert labels.tolist() == [0]
