"""Train a small CNN on Fashion-MNIST and save a plain state_dict plus a JSON sidecar.

This produces the dense model that the demo prunes (cswap/demo/fashion_resnet8.pt). It runs on
a laptop CPU in minutes, reads the IDX files directly (no download), and is fully seeded so the
checkpoint can be regenerated with the command recorded in its sidecar.

    python benchmarks/train_fashion_mnist.py --arch cifar_resnet8 --width 16 --epochs 4 \
        --out cswap/demo/fashion_resnet8.pt

Data: the full Fashion-MNIST, read locally (`apt-get install dataset-fashion-mnist`, or
CSWAP_FASHION_MNIST=DIR; see benchmarks/datasets.py); without it the script stops at once
with that hint.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SCRIPT = str(Path(__file__).resolve().relative_to(REPO_ROOT))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.cifar_resnet import (
    cifar_resnet8,
    cifar_resnet14,
    cifar_resnet20,
    cifar_resnet32,
)
from adapters.small_mobilenet import fmnist_mobilenetv2
from benchmarks.datasets import fashion_mnist_root
from tasks.idx_files import load_mnist_split

# Name -> builder(width=..., num_classes=..., in_channels=...). Add new model families here.
ARCHS = {
    "cifar_resnet8": cifar_resnet8,
    "cifar_resnet14": cifar_resnet14,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "fmnist_mobilenetv2": fmnist_mobilenetv2,  # width = stem channels (16 -> width_mult 1)
}

# Fashion-MNIST train-split pixel statistics (on the [0, 1] scale).
MEAN, STD = 0.2860, 0.3530
PAD = 2


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardised with the train statistics."""
    x = torch.tensor(images, dtype=torch.float32).div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel-padded crop and horizontal flip, batched with tensor ops (no PIL).

    The padding is black in pixel space, i.e. the normalised value of 0, so the shifted border
    looks like the dataset's own background rather than mid-grey.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), value=(0.0 - MEAN) / STD)
    dy = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (BatchNorm uses running statistics)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="cifar_resnet8")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=None,
                   help="folder with the four IDX files (default: $CSWAP_FASHION_MNIST, else Debian's; see benchmarks/datasets.py)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on the first N images of a seeded shuffle of the train split")
    p.add_argument("--out", type=Path, required=True, help="path of the .pt state_dict")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    for name in ("width", "epochs", "batch_size", "train_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    args.root = fashion_mnist_root(args.root)
    train_images, train_labels = load_mnist_split(args.root, "train")
    test_images, test_labels = load_mnist_split(args.root, "test")
    if args.train_limit is not None:
        keep = rng.permutation(len(train_images))[: args.train_limit]
        train_images, train_labels = train_images[keep], train_labels[keep]
    x_train, y_train = normalise(train_images), torch.from_numpy(train_labels)
    x_test, y_test = normalise(test_images), torch.from_numpy(test_labels)

    model = ARCHS[args.arch](width=args.width, num_classes=10, in_channels=1)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # One-cycle: a short warm-up then annealing to ~0 gets most of the accuracy in a few epochs.
    # OneCycleLR divides by the length of each phase, so tiny smoke-test runs need at least two
    # warm-up steps and one annealing step; real runs keep the 25% warm-up.
    total_steps = args.epochs * steps_per_epoch
    if total_steps < 4:
        raise SystemExit(f"need at least 4 optimiser steps for the one-cycle schedule, got {total_steps}")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=max(0.25, 2 / total_steps)
    )
    print(f"{args.arch} width={args.width}: {n_params} parameters, {len(x_train)} train images, "
          f"{steps_per_epoch} steps/epoch", flush=True)

    t_start = time.perf_counter()
    test_acc = 0.0
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        test_acc = evaluate(model, x_test, y_test)
        print(f"epoch {epoch}/{args.epochs}  loss {loss_sum / len(x_train):.4f}  "
              f"train acc {correct / len(x_train):.4f}  test acc {test_acc:.4f}  "
              f"{time.perf_counter() - t_epoch:.1f}s", flush=True)
    wall = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    meta = {
        "arch": args.arch,
        "width": args.width,
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_images": len(x_train),
        "test_accuracy": test_acc,
        "num_params": n_params,
        "wall_time_s": round(wall, 1),
        "torch_version": torch.__version__,
        "command": shlex.join(["python", *sys.argv] if argv is None else ["python", SCRIPT, *argv]),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f} on {len(x_test)} images; saved {args.out} ({wall:.0f}s)", flush=True)
    return meta


if __name__ == "__main__":
    main()
