"""Datasets and loaders: shapes, normalisation, class-balanced limits, augmentation, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sj_parallel_conversion.tools import data


def test_cifar10_dir_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("SJPC_CIFAR10_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="SJPC_CIFAR10_DIR"):
        data.cifar10_dir()
    with pytest.raises(FileNotFoundError, match="root="):
        data.cifar10_npz("test")
    monkeypatch.setenv("SJPC_CIFAR10_DIR", "/some/where")
    assert data.cifar10_dir() == Path("/some/where")


def _fake_cifar_npz(tmp_path, n_per_class=(5, 3, 4), hw=(4, 5)):
    """A small file in the layout of the real ones: uint8 NHWC images, labels in shuffled order."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(len(n_per_class)), n_per_class)).astype(np.uint8)
    x = rng.integers(0, 256, (len(y), *hw, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    return x, y


def test_cifar10_npz_reads_nhwc_uint8_as_normalised_nchw_float(tmp_path):
    x, y = _fake_cifar_npz(tmp_path)
    raw_x, raw_y = data.cifar10_npz("test", root=tmp_path, normalize=False).tensors
    assert raw_x.shape == (len(y), 3, 4, 5) and raw_x.dtype == torch.float32 and raw_y.dtype == torch.int64
    assert raw_y.tolist() == y.tolist()
    # image 3, channel 2, row 1, column 4 is byte x[3, 1, 4, 2] / 255
    assert float(raw_x[3, 2, 1, 4]) == pytest.approx(x[3, 1, 4, 2] / 255.0, abs=1e-7)
    torch.testing.assert_close(raw_x, torch.from_numpy(x).permute(0, 3, 1, 2).double().div(255).float())
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(data.cifar10_npz("test", root=tmp_path).tensors[0], (raw_x - mean) / std)
    m, s = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    torch.testing.assert_close(data.cifar10_npz("test", root=tmp_path, mean=m, std=s).tensors[0],
                               (raw_x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1))


def test_cifar10_npz_limit_is_class_balanced_and_ordered(tmp_path):
    _, y = _fake_cifar_npz(tmp_path)  # 5, 3 and 4 images of classes 0, 1, 2
    sub_x, sub_y = data.cifar10_npz("test", root=tmp_path, limit=6, normalize=False).tensors
    # each class: its first two images, in file order
    idx = sorted(i for c in range(3) for i in np.flatnonzero(y == c)[:2])
    assert sub_y.tolist() == y[idx].tolist()
    torch.testing.assert_close(sub_x, data.cifar10_npz("test", root=tmp_path, normalize=False).tensors[0][idx])
    # 8 images: 8 // 3 = 2 of each class, then the 2 earliest images not yet taken
    idx8 = sorted(idx + [i for i in range(len(y)) if i not in idx][:2])
    x8, y8 = data.cifar10_npz("test", root=tmp_path, limit=8, normalize=False).tensors
    assert y8.tolist() == y[idx8].tolist()
    torch.testing.assert_close(x8, data.cifar10_npz("test", root=tmp_path, normalize=False).tensors[0][idx8])


@pytest.mark.slow  # reads and normalises the 10,000 real test images
def test_cifar10_npz_real_test_split(cifar10_dir):
    ds = data.cifar10_npz("test", root=cifar10_dir)
    x, y = ds.tensors
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [1000] * 10
    # normalised with the training statistics: the test set is close to zero mean, unit std
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    # limit: the first images of each class of the real file, in file order
    x100, y100 = data.cifar10_npz("test", root=cifar10_dir, limit=100).tensors
    assert torch.bincount(y100, minlength=10).tolist() == [10] * 10
    idx = torch.from_numpy(data.balanced_indices(y.numpy(), 100))
    assert torch.equal(x[idx], x100) and torch.equal(y[idx], y100)


def test_balanced_indices_edge_cases():
    y = np.array([0, 0, 0, 1, 1, 2])
    assert data.balanced_indices(y, 100).tolist() == list(range(6))
    assert data.balanced_indices(y, 3).tolist() == [0, 3, 5]
    assert data.balanced_indices(y, 4).tolist() == [0, 1, 3, 5]
    with pytest.raises(ValueError):
        data.balanced_indices(y, -1)


def test_cifar10_npz_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as exc:
        data.cifar10_npz("train", root=tmp_path)
    assert str(tmp_path / "train.npz") in str(exc.value) and "SJPC_CIFAR10_DIR" in str(exc.value)
    monkeypatch.setenv("SJPC_CIFAR10_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.cifar10_npz("test")
    with pytest.raises(ValueError, match="split"):
        data.cifar10_npz("validation", root=tmp_path)


def test_digits_split_is_deterministic_and_standardised():
    tr, te = data.digits("train"), data.digits("test")
    assert tr.tensors[0].shape == (1347, 1, 8, 8) and te.tensors[0].shape == (450, 1, 8, 8)
    assert tr.tensors[0].dtype == torch.float32 and te.tensors[1].dtype == torch.int64
    assert abs(float(tr.tensors[0].mean())) < 1e-4 and abs(float(tr.tensors[0].std()) - 1) < 1e-2
    assert torch.equal(data.digits("test").tensors[0], te.tensors[0])
    assert not torch.equal(data.digits("test", seed=1).tensors[0], te.tensors[0])
    assert torch.bincount(te.tensors[1]).min() >= 40  # stratified
    with pytest.raises(ValueError):
        data.digits("holdout")


def test_random_crop_flip_matches_a_crop_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        crops = [xp[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        crops += [c.flip(2) for c in crops]
        assert any(torch.equal(out[b], c) for c in crops)
    # padding 0: only flips
    out0 = data.random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    for b in range(2):
        assert torch.equal(out0[b], x[b]) or torch.equal(out0[b], x[b].flip(2))


def test_make_loader_limit_shuffle_and_augment():
    ds = torch.utils.data.TensorDataset(torch.randn(50, 3, 32, 32), torch.arange(50))
    loader = data.make_loader(ds, 16, limit=20)
    ys = torch.cat([y for _, y in loader])
    assert ys.tolist() == list(range(20)) and loader.num_workers == 0
    aug = data.make_loader(ds, 16, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))
    xs, ys = zip(*aug)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (50, 3, 32, 32) and sorted(y.tolist()) == list(range(50))
    assert not torch.equal(x, ds.tensors[0][y])  # augmented


def test_torchvision_dataset_never_downloads_and_reads_imagefolder(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        data.torchvision_dataset("cifar10", tmp_path, "train")
    with pytest.raises(ValueError, match="kind"):
        data.torchvision_dataset("mnist", tmp_path, "train")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray(np.random.randint(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "val" / cls / "0.png")
    ds = data.torchvision_dataset("imagefolder", tmp_path, "test", image_size=32)
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and len(ds) == 2
    with pytest.raises(FileNotFoundError):
        data.torchvision_dataset("imagefolder", tmp_path / "missing", "test")


def test_cifar10_subset_shapes_balance_and_normalisation():
    x, y = data.cifar10_subset("test").tensors
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    xtr, ytr = data.cifar10_subset("train").tensors
    assert xtr.shape == (1024, 3, 32, 32) and torch.bincount(ytr, minlength=10).min() >= 102
    raw = data.cifar10_subset("test", limit=20, normalize=False).tensors[0]
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(data.cifar10_subset("test", limit=20).tensors[0], (raw - mean) / std)
    # "val" names the test split, as for cifar10_npz
    assert torch.equal(data.cifar10_subset("val", limit=10).tensors[1], data.cifar10_subset("test", limit=10).tensors[1])


def test_cifar10_subset_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.cifar10_subset("validation")
    with pytest.raises(ValueError, match="limit"):
        data.cifar10_subset("test", limit=0)


@pytest.mark.slow  # reads the 141 MB training array
def test_cifar10_subset_is_the_documented_selection_of_the_full_arrays(cifar10_dir):
    """The shipped images are bit-identical to the full arrays at the recorded positions, and the
    positions are the class-balanced selection the data_files README states."""
    with np.load(data.CIFAR10_SUBSET_PATH) as sub:
        for split, n in (("test", 1000), ("train", 1024)):
            with np.load(Path(cifar10_dir) / f"{split}.npz") as full:
                fx, fy = full["x"], full["y"]
            idx = sub[f"index_{split}"]
            assert idx.tolist() == data.balanced_indices(fy, n).tolist()
            assert np.array_equal(sub[f"x_{split}"], fx[idx])
            assert np.array_equal(sub[f"y_{split}"], fy[idx])


def test_cifar10_subset_found_from_another_directory(tmp_path, monkeypatch):
    """Package data, not a path relative to the working directory or to $SJPC_CIFAR10_DIR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SJPC_CIFAR10_DIR", raising=False)
    assert len(data.cifar10_subset("train", limit=30)) == 30


def test_arrays_and_normalisation_are_checked_in_one_place(tmp_path):
    """data.check_images / check_normalisation guard every loader, whichever caller feeds it."""
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    data.check_images(x, np.arange(4), "ok", 10)
    with pytest.raises(ValueError, match=r"f: images are float64 \(they look scaled"):
        data.check_images(x / 255.0, np.arange(4), "f", 10)
    with pytest.raises(ValueError, match="labels range from 0 to 3; expected 0 to 2"):
        data.check_images(x, np.arange(4), "l", 3)
    np.savez(tmp_path / "test.npz", x=x, y=np.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"test.npz.*labels range from -1"):
        data.cifar10_npz("test", root=tmp_path)
    np.savez(tmp_path / "test.npz", images=x)
    with pytest.raises(ValueError, match=r"holds arrays \['images'\]; expected 'x'"):
        data.cifar10_npz("test", root=tmp_path)
    with pytest.raises(ValueError, match="std values must be positive"):
        data.cifar10_subset("test", mean=[0.5] * 3, std=[0.2, -0.2, 0.2])
    with pytest.raises(ValueError, match="mean has 2 values but the images have 3 channels"):
        data.torchvision_dataset("imagefolder", tmp_path, "test", mean=[0.5, 0.5], std=[0.2, 0.2])


@pytest.mark.parametrize("n, k", [(7, 3), (5, 1), (3, 3), (1, 2)])
def test_blends_mix_every_item_with_k_others_at_the_stated_weights(n, k):
    from sj_parallel_conversion.augment import blends
    x = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(n))
    out = blends(x, k, torch.Generator().manual_seed(0))
    assert out.shape == (k * n, 2, 3)
    for i in range(n):
        partners = []
        for r in range(1, k + 1):
            w = 1 - r / (k + 1)
            row = out[(r - 1) * n + i]
            # which item j makes row == w x[i] + (1 - w) x[j]? exactly one
            hits = [j for j in range(n) if torch.allclose(row, w * x[i] + (1 - w) * x[j], atol=1e-6)]
            assert len(hits) == 1, (i, r, hits)
            partners.append(hits[0])
        if n > k:  # k different partners, none of them the item itself
            assert len(set(partners)) == k and i not in partners
    assert blends(x, 0).shape == (0, 2, 3)
