"""Datasets and loaders: the project's CIFAR-10 npz files, scikit-learn digits, torchvision datasets.

Nothing here downloads unless asked to (``torchvision_dataset(..., download=True)``).

* :func:`cifar10_npz` -- CIFAR-10 from ``train.npz`` / ``test.npz`` (``$SJPC_CIFAR10_DIR``).
* :func:`cifar10_subset` -- 1,000 test and 1,024 training CIFAR-10 images shipped inside the package.
* :func:`digits` -- scikit-learn's 8x8 digits as ``[N, 1, 8, 8]`` tensors (bundled, no download).
* :func:`torchvision_dataset` -- torchvision CIFAR-10/100 or an ImageNet-style ``ImageFolder``.
* :func:`make_loader` -- a ``DataLoader`` with optional, batched CIFAR-style augmentation.

Every image array and normalisation is checked before use, in one place each, whichever command
or function feeds it: :func:`check_images` (uint8 ``[N, H, W, C]`` images with 1, 3 or 4
channels, one integer label per image, labels from 0 to the class count - 1) and
:func:`check_normalisation` (finite means, positive finite stds, one of each per channel).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from ..augment import random_crop_flip

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "cifar10_dir", "cifar10_npz", "cifar10_subset", "CIFAR10_SUBSET_PATH", "digits", "torchvision_dataset", "make_loader",
    "balanced_indices", "check_images", "check_normalisation", "CIFAR10_CLASSES",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_CLASSES = 10

ENV_VAR = "SJPC_CIFAR10_DIR"
#: The CIFAR-10 subset shipped as package data (see ``data_files/README.md`` next to it).
CIFAR10_SUBSET_PATH = Path(__file__).resolve().parent / "data_files" / "cifar10_subset.npz"
_SPLITS = {"train": "train", "test": "test", "val": "test"}


def cifar10_dir() -> Path:
    """The folder named by ``$SJPC_CIFAR10_DIR`` (there is no default location).

    Raises ``FileNotFoundError`` when the variable is unset or empty, saying how to name the folder.
    """
    env = os.environ.get(ENV_VAR)
    if not env:
        raise FileNotFoundError(
            f"no CIFAR-10 folder given: set the environment variable {ENV_VAR} to the folder holding "
            "train.npz and test.npz, or pass root=... (the CLI's --data-root)")
    return Path(env)


def check_normalisation(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                        channels: Optional[int] = None, names: Sequence[str] = ("mean", "std")) -> None:
    """Check an input normalisation before any image is read: finite numbers, ``std > 0``, as many
    means as stds, and one of each per channel when ``channels`` is known (``None`` stands for
    the dataset's default). ``names`` are what the messages call them (the CLI's ``--mean`` /
    ``--std``). Raises ``ValueError``."""
    m_name, s_name = names
    for name, values in ((m_name, mean), (s_name, std)):
        if values is None:
            continue
        try:
            floats = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of numbers, got {values!r:.80}") from None
        if not floats or not all(np.isfinite(floats)):
            raise ValueError(f"{name} values must be finite numbers, got {floats}")
        if name == s_name and not all(v > 0 for v in floats):
            raise ValueError(f"{s_name} values must be positive, got {floats}")
    if mean is not None and std is not None and len(mean) != len(std):
        raise ValueError(f"{m_name} has {len(mean)} values but {s_name} has {len(std)}")
    for name, values in ((m_name, mean), (s_name, std)):
        if channels is not None and values is not None and len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels "
                             "(give one value per channel)")


def check_images(x: np.ndarray, y: np.ndarray, source: str, num_classes: Optional[int] = None) -> None:
    """Check image and label arrays before any work: ``x`` uint8 ``[N, H, W, C]`` with C in
    (1, 3, 4), ``y`` one integer label per image, from 0 to ``num_classes - 1`` when given.
    Raises ``ValueError`` naming ``source`` and saying what is expected."""
    expected = "expected uint8 images of shape [N, H, W, C] with values 0..255 and C = 1, 3 or 4"
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise ValueError(f"{source}: images and labels must be arrays; {expected}")
    if x.dtype != np.uint8:
        hint = ""
        if np.issubdtype(x.dtype, np.floating) and x.size and np.nanmax(x) <= 1.0:
            hint = " (they look scaled to [0, 1]: store (x * 255).round().astype(np.uint8))"
        raise ValueError(f"{source}: images are {x.dtype}{hint}; {expected}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        layout = " (channels first? transpose to [N, H, W, C])" if x.ndim == 4 and x.shape[1] in (1, 3, 4) else ""
        raise ValueError(f"{source}: images have shape {tuple(x.shape)}{layout}; {expected}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ValueError(f"{source}: labels are {y.dtype} of shape {tuple(y.shape)}; expected one integer label "
                         "per image, shape [N]")
    if len(y) != len(x):
        raise ValueError(f"{source}: {len(x)} images but {len(y)} labels; expected one label per image")
    if len(y) and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        bound = f"0 to {num_classes - 1}" if num_classes is not None else "0 or more"
        raise ValueError(f"{source}: labels range from {int(y.min())} to {int(y.max())}; expected {bound}")


def _split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def balanced_indices(labels: Union[np.ndarray, torch.Tensor], limit: int) -> np.ndarray:
    """Deterministic, class-balanced subset of ``limit`` indices, in the original order.

    Takes the first ``limit // C`` images of every class (C = number of classes present), then
    fills the remainder with the next images in the original order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    classes = np.unique(labels)
    per = limit // len(classes)
    keep = np.zeros(n, dtype=bool)
    for c in classes:
        keep[np.flatnonzero(labels == c)[:per]] = True
    rest = limit - int(keep.sum())
    if rest > 0:
        keep[np.flatnonzero(~keep)[:rest]] = True
    return np.flatnonzero(keep)


def cifar10_npz(split: str, root: Optional[Union[str, Path]] = None, limit: Optional[int] = None,
                normalize: bool = True, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> TensorDataset:
    """CIFAR-10 from the project's npz files as float32 NCHW images in [0, 1] (normalised with
    ``mean`` / ``std``, default :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, if ``normalize``) and
    int64 labels.

    ``limit`` keeps a deterministic class-balanced subset (:func:`balanced_indices`): the first
    ``limit // 10`` images of each class, in the original order.
    """
    name = _split(split)
    d = Path(root) if root is not None else cifar10_dir()
    path = d / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 file {str(path)!r} not found; pass root=... or set the environment variable "
            f"{ENV_VAR} to the folder holding train.npz and test.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"x", "y"} <= set(z.files):
                raise ValueError(f"CIFAR-10 file {str(path)!r} holds arrays {sorted(z.files)}; expected 'x' (images) "
                                 "and 'y' (labels)")
            x, y = z["x"], z["y"]
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"CIFAR-10 file {str(path)!r} is not a readable npz file ({exc})") from None
    return _uint8_nhwc_dataset(x, y, limit, normalize, mean, std, f"CIFAR-10 file {str(path)!r}")


def _uint8_nhwc_dataset(x: np.ndarray, y: np.ndarray, limit: Optional[int], normalize: bool,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        source: str = "images") -> TensorDataset:
    """uint8 NHWC images and labels -> float32 NCHW TensorDataset (optionally a balanced subset),
    after :func:`check_images` and :func:`check_normalisation`."""
    check_images(x, y, source, CIFAR10_CLASSES)
    if normalize:
        try:
            check_normalisation(CIFAR10_MEAN if mean is None else mean, CIFAR10_STD if std is None else std,
                                x.shape[-1])
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    if limit is not None:
        idx = balanced_indices(y, limit)
        x, y = x[idx], y[idx]
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if normalize:
        m = torch.tensor(CIFAR10_MEAN if mean is None else tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(CIFAR10_STD if std is None else tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
        xt.sub_(m).div_(s)
    return TensorDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)))


def cifar10_subset(split: str, limit: Optional[int] = None, normalize: bool = True,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> TensorDataset:
    """A small CIFAR-10 subset shipped inside the package: no download, no ``$SJPC_CIFAR10_DIR``.

    ``split='test'``: 1,000 test images (the first 100 of every class of the official test set);
    ``split='train'``: 1,024 training images (the first 102 of every class, plus the next 4), meant
    for calibration. Images come as float32 ``[N, 3, 32, 32]`` normalised with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, the normalisation the shipped checkpoints were
    trained with (``normalize=False`` keeps them in [0, 1]; ``mean``/``std`` replace the
    normalisation); labels as int64. ``limit`` keeps a class-balanced part
    (:func:`balanced_indices`).
    """
    name = _split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"cifar10_subset: limit must be a positive integer or None, got {limit!r}")
    if not CIFAR10_SUBSET_PATH.is_file():
        raise FileNotFoundError(
            f"cifar10_subset: package data file {str(CIFAR10_SUBSET_PATH)!r} is missing; reinstall the package")
    with np.load(CIFAR10_SUBSET_PATH, allow_pickle=False) as z:
        x, y = z[f"x_{name}"], z[f"y_{name}"]
    return _uint8_nhwc_dataset(x, y, limit, normalize, mean, std, "the shipped CIFAR-10 subset")


def digits(split: str, test_fraction: float = 0.25, seed: int = 0) -> TensorDataset:
    """scikit-learn's 8x8 digits as ``[N, 1, 8, 8]`` float32, scaled to [0, 1] then standardised
    with the training split's mean/std; a deterministic stratified train/test split."""
    name = _split(split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.images.astype(np.float32) / 16.0
    y = ds.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_sel, y_sel = (x_tr, y_tr) if name == "train" else (x_te, y_te)
    xt = (torch.from_numpy(x_sel).unsqueeze(1) - mean) / std
    return TensorDataset(xt.float().contiguous(), torch.from_numpy(y_sel))


def torchvision_dataset(kind: str, root: Union[str, Path], split: str, download: bool = False,
                        train_transform: bool = False, image_size: int = 224,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dataset:
    """torchvision CIFAR-10/100 (``root`` as for torchvision) or an ``ImageFolder``.

    For ``imagefolder`` the folder is ``root/<split>`` when it exists (``train``, ``val`` or
    ``test``; ``test`` also tries ``val``), else ``root`` itself. Transforms: ToTensor + Normalize;
    ImageNet: Resize(image_size * 256 / 224), CenterCrop(image_size). ``mean`` / ``std`` replace the
    dataset's usual normalisation (CIFAR's, or ImageNet's for folders). ``train_transform`` adds
    random crop + flip. Never downloads unless ``download=True``.
    """
    import torchvision
    import torchvision.transforms as T

    name = _split(split)
    root = Path(root)
    check_normalisation(mean, std, 3)  # torchvision's CIFAR and ImageFolder images are RGB
    if kind in ("cifar10", "cifar100"):
        dm, ds = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        mean, std = dm if mean is None else mean, ds if std is None else std
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train_transform else []
        tf = T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])
        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        try:
            return cls(str(root), train=(name == "train"), transform=tf, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{kind} not found under {str(root)!r} ({exc}); pass download=True (--download) to fetch it") from exc
    if kind == "imagefolder":
        mean, std = IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std
        candidates = [root / split, root / name] + ([root / "val"] if name == "test" else [])
        folder = next((c for c in candidates if c.is_dir()), root)
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageFolder root {str(folder)!r} does not exist")
        if train_transform:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize(mean, std)])
        else:
            tf = T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.ToTensor(),
                            T.Normalize(mean, std)])
        return torchvision.datasets.ImageFolder(str(folder), transform=tf)
    raise ValueError(f"kind must be 'cifar10', 'cifar100' or 'imagefolder', got {kind!r}")


class _AugmentCollate:
    def __init__(self, padding: int = 4):
        self.padding = padding

    def __call__(self, batch):
        x, *rest = default_collate(batch)
        return [random_crop_flip(x, self.padding), *rest]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, limit: Optional[int] = None,
                augment: bool = False, generator: Optional[torch.Generator] = None,
                drop_last: bool = False) -> DataLoader:
    """A single-process ``DataLoader`` over ``dataset`` (its first ``limit`` items if given).

    ``augment=True`` applies :func:`random_crop_flip` to every batch of images (meant for tensor
    datasets such as :func:`cifar10_npz`; torchvision datasets use ``train_transform`` instead).
    """
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    collate = _AugmentCollate() if augment else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, collate_fn=collate,
                      generator=generator, drop_last=drop_last)
