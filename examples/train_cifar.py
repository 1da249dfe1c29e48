"""Train a zoo model (ReLU or QCFS) on CIFAR-10/100: the paper's A.2 optimiser, and its
augmentation with ``--augment paper``.

    python examples/train_cifar.py --model cnn --act qcfs --L 4 --epochs 300 --augment paper \
        --checkpoint runs/cnn_qcfs.pt --export runs/cifar10_cnn_qcfs_L4.pt

SGD (momentum 0.9), lr 0.1 (CIFAR-10) / 0.02 (CIFAR-100), weight decay 5e-4, cosine annealing:
the hyper-parameters of the paper's appendix A.2. Augmentation (``--augment``):

* ``crop-flip`` (default, what the shipped checkpoints were trained with): random crop (pad 4) +
  horizontal flip;
* ``paper``: A.2's augmentation, crop + flip, AutoAugment's CIFAR-10 policy (Cubuk et al. 2019)
  and Cutout of one 16 x 16 square (DeVries & Taylor 2017), the pipeline of the QCFS code the
  paper builds on;
* ``none``.

The paper trains for hundreds of epochs on a GPU; the shipped checkpoints are short CPU runs
(``sj_parallel_conversion/tools/checkpoints/README.md``), so they are not the paper's recipe.
``--checkpoint`` is written after every epoch with the optimizer/scheduler state (``--resume``
continues from it, also to a larger ``--epochs``); ``--export`` writes the final weights +
metadata only (small; what ``load_checkpoint`` needs). Test accuracy is measured in float32 after
every epoch, even with ``--amp``.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sj_parallel_conversion.tools import data, models  # noqa: E402
from sj_parallel_conversion.fileio import load_tensor_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn", choices=models.MODEL_NAMES)
    p.add_argument("--act", default="relu", choices=models.ACTIVATIONS)
    p.add_argument("--L", type=int, default=4, help="QCFS quantization levels (with --act qcfs)")
    p.add_argument("--theta", type=float, default=8.0, help="initial QCFS threshold (with --act qcfs)")
    p.add_argument("--shortcut", choices=["A", "B"], default=None, help="resnet20..56 shortcut option")
    p.add_argument("--pool", choices=["avg", "max"], default=None, help="vgg16 pooling")
    p.add_argument("--width", type=float, default=None, help="vgg16 channel multiplier (0.25: 16..128 channels)")
    p.add_argument("--hidden", type=int, default=None, help="vgg16 classifier width (default 4096)")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--data", choices=["npz", "torchvision"], default="npz",
                   help="npz: the project's CIFAR-10 files ($SJPC_CIFAR10_DIR); torchvision: CIFAR10/CIFAR100")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download the data")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default 0.1 (CIFAR-10) / 0.02 (CIFAR-100)")
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--augment", choices=["crop-flip", "paper", "none"], default="crop-flip",
                   help="crop-flip (default): random crop + flip; paper: crop + flip + AutoAugment (CIFAR-10 "
                        "policy) + Cutout 16x16, the paper's A.2; none")
    p.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 + GradScaler on CUDA")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format (about 1.25x faster training on CPU here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="class-balanced training subset")
    p.add_argument("--limit-test", type=int, default=None, help="class-balanced test subset")
    p.add_argument("--checkpoint", default=None, help="training state, written every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--export", default=None, help="final weights + metadata only (no optimizer state)")
    p.add_argument("--no-progress", action="store_true")
    return p


class PaperAugment:
    """Collate function of the paper's augmentation for normalised ``[C, 32, 32]`` images: random
    crop (pad 4, black) + horizontal flip, AutoAugment's CIFAR-10 policy drawn per image, then
    Cutout (one ``length`` x ``length`` square set to 0 after normalisation, clipped at borders)."""

    def __init__(self, mean, std, length: int = 16):
        import torchvision.transforms as T

        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.length = length
        self.autoaugment = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    def __call__(self, batch):
        from torch.utils.data import default_collate

        x, y = default_collate(batch)
        pixels = data.random_crop_flip(x * self.std + self.mean)  # [0, 1]: pads black like torchvision
        pixels = (pixels * 255).round_().clamp_(0, 255).to(torch.uint8)
        # AutoAugment draws one sub-policy per call: per image, not one for the whole batch.
        pixels = torch.stack([self.autoaugment(img) for img in pixels])
        x = (pixels.float() / 255 - self.mean) / self.std
        return cutout(x, self.length), y


def cutout(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero one ``length`` x ``length`` square per image, centred anywhere in the image (DeVries &
    Taylor 2017: parts of the square outside the image are simply lost)."""
    b, _, h, w = x.shape
    cy, cx = torch.randint(0, h, (b,)), torch.randint(0, w, (b,))
    rows, cols = torch.arange(h), torch.arange(w)
    inside_y = (rows[None, :] >= (cy - length // 2)[:, None]) & (rows[None, :] < (cy + length - length // 2)[:, None])
    inside_x = (cols[None, :] >= (cx - length // 2)[:, None]) & (cols[None, :] < (cx + length - length // 2)[:, None])
    hole = inside_y[:, :, None] & inside_x[:, None, :]  # [B, H, W]
    return x.masked_fill(hole[:, None], 0.0)


def _datasets(args):
    crop_flip = args.augment == "crop-flip"
    if args.data == "npz":
        if args.dataset != "cifar10":
            raise SystemExit("--data npz holds CIFAR-10 only; use --data torchvision for CIFAR-100")
        train = data.cifar10_npz("train", root=args.data_root, limit=args.limit_train)
        test = data.cifar10_npz("test", root=args.data_root, limit=args.limit_test)
        return train, test, crop_flip
    if args.data_root is None:
        raise SystemExit("--data torchvision needs --data-root")
    train = data.torchvision_dataset(args.dataset, args.data_root, "train", download=args.download,
                                     train_transform=crop_flip)
    test = data.torchvision_dataset(args.dataset, args.data_root, "test", download=args.download)
    if args.limit_train is not None:
        train = torch.utils.data.Subset(train, data.balanced_indices(train.targets, args.limit_train).tolist())
    if args.limit_test is not None:
        test = torch.utils.data.Subset(test, data.balanced_indices(test.targets, args.limit_test).tolist())
    return train, test, False


@torch.no_grad()
def evaluate(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume and not args.checkpoint:
        raise SystemExit("--resume needs --checkpoint")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    num_classes = 10 if args.dataset == "cifar10" else 100
    lr = args.lr if args.lr is not None else (0.1 if args.dataset == "cifar10" else 0.02)
    kwargs = {}
    if args.shortcut is not None:
        kwargs["shortcut"] = args.shortcut
    if args.pool is not None:
        kwargs["pool"] = args.pool
    if args.width is not None:
        kwargs["width"] = args.width
    if args.hidden is not None:
        kwargs["hidden"] = args.hidden

    train_set, test_set, augment = _datasets(args)
    g = torch.Generator().manual_seed(args.seed)
    if args.augment == "paper":
        mean, std = ((data.CIFAR10_MEAN, data.CIFAR10_STD) if args.dataset == "cifar10"
                     else (data.CIFAR100_MEAN, data.CIFAR100_STD))
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=g,
                                                   collate_fn=PaperAugment(mean, std))
    else:
        train_loader = data.make_loader(train_set, args.batch_size, shuffle=True, augment=augment, generator=g)
    test_loader = data.make_loader(test_set, 256)

    model = models.build_model(args.model, num_classes=num_classes, act=args.act, L=args.L, theta=args.theta,
                               **kwargs).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    use_cuda_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    start_epoch, history = 0, []

    if args.resume:
        try:
            blob = load_tensor_file(args.checkpoint, what="--resume checkpoint")
        except (OSError, ValueError) as exc:
            raise SystemExit(f"train_cifar.py: error: {exc}") from None
        model.load_state_dict(blob["state_dict"])
        if "optimizer" in blob:
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["scheduler"])
            if use_cuda_amp and blob.get("scaler"):
                scaler.load_state_dict(blob["scaler"])
        sched.T_max = args.epochs  # continuing to a larger --epochs stretches the cosine
        start_epoch = int(blob.get("epoch", 0))
        history = list(blob.get("history", []))
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}", flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])))
    meta = dict(name=args.model, act=args.act, L=args.L, num_classes=num_classes, in_channels=3, kwargs=kwargs)

    def extra(acc):
        return {"input_size": (32, 32), "dataset": args.dataset, "test_accuracy": acc,
                "test_images": len(test_set), "train_images": len(train_set), "epochs": args.epochs,
                "augment": args.augment, "theta_init": args.theta if args.act == "qcfs" else None, "command": command, "history": history}

    acc = history[-1]["test_accuracy"] if history else float("nan")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.perf_counter()
        from sj_parallel_conversion.progress import progress

        bar = progress(train_loader, f"epoch {epoch + 1}/{args.epochs}", not args.no_progress)
        loss_sum = correct = seen = 0
        for x, y in bar:
            x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        sched.step()
        train_s = time.perf_counter() - t0
        acc = evaluate(model, test_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "test_accuracy": acc, "train_seconds": round(train_s, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}  train acc {100 * correct / seen:.2f}%  "
              f"test acc {100 * acc:.2f}%  ({train_s:.0f}s train, {time.perf_counter() - t0 - train_s:.0f}s test)",
              flush=True)
        if args.checkpoint:
            state = dict(extra(acc), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch + 1,
                         scaler=scaler.state_dict() if use_cuda_amp else None)
            models.save_checkpoint(args.checkpoint, model, **{k: meta[k] for k in meta if k != "kwargs"},
                                   kwargs=kwargs, extra=state)
    if args.export:
        models.save_checkpoint(args.export, model, **{k: meta[k] for k in meta if k != "kwargs"}, kwargs=kwargs,
                               extra=extra(acc))
        print(f"wrote {args.export} (test accuracy {100 * acc:.2f}%)", flush=True)
    return {"test_accuracy": acc, "history": history, "model": model}


if __name__ == "__main__":
    main()
