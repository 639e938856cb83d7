"""Train a classifier on Fashion-MNIST and save a plain state_dict plus a JSON sidecar.

This produces the dense model that the demo prunes (cswap/demo/fashion_resnet8.pt). It runs on
a laptop CPU in minutes, reads the IDX files directly (no download), and is fully seeded so the
checkpoint can be regenerated with the command recorded in its sidecar.

    python benchmarks/train_fashion_mnist.py --arch cifar_resnet8 --width 16 --epochs 4 \
        --out cswap/demo/fashion_resnet8.pt

Any timm architecture (random init, nothing downloaded) trains with `--arch timm --timm-model
NAME --model-kwargs JSON`, e.g. a small DeiT on 1x28x28 images with AdamW, linear warm-up then
cosine, and label smoothing:

    python benchmarks/train_fashion_mnist.py --arch timm --timm-model deit_tiny_patch16_224 \
        --model-kwargs '{"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 128}' \
        --optimizer adamw --lr 1e-3 --schedule cosine --warmup-epochs 1 --label-smoothing 0.1 ...

The sidecar records the command, the model's arguments and each epoch's loss and accuracies
(train and full test split), so a plateau can be read off it.

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

from benchmarks.datasets import fashion_mnist_root
from cswap.removal import count_params
from cswap.models.cifar_resnet import (
    cifar_resnet8,
    cifar_resnet14,
    cifar_resnet20,
    cifar_resnet32,
)
from cswap.models.small_mobilenet import fmnist_mobilenetv2
from cswap.tasks.idx_files import load_mnist_split

# Name -> builder(width=..., num_classes=..., in_channels=...). Add new model families here.
ARCHS = {
    "cifar_resnet8": cifar_resnet8,
    "cifar_resnet14": cifar_resnet14,
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "fmnist_mobilenetv2": fmnist_mobilenetv2,  # width = stem channels (16 -> width_mult 1)
}

TIMM = "timm"  # --arch timm: timm.create_model(--timm-model, pretrained=False, **--model-kwargs)

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
    p.add_argument("--arch", choices=sorted(ARCHS) + [TIMM], default="cifar_resnet8")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (not with --arch timm)")
    p.add_argument("--timm-model", default=None, help="timm architecture name, with --arch timm (random init)")
    p.add_argument("--model-kwargs", type=json.loads, default=None,
                   help="JSON object of keyword arguments for timm.create_model, with --arch timm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: Nesterov momentum 0.9; adamw: no decay on biases, norms, position/class tokens")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4 (sgd) or 0.05 (adamw)")
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle",
                   help="onecycle: torch's OneCycleLR, 25%% warm-up; cosine: linear warm-up then cosine to 0")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="warm-up length of --schedule cosine")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
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
    if (args.arch == TIMM) != (args.timm_model is not None):
        p.error("--timm-model goes with --arch timm, and --arch timm needs --timm-model")
    if args.model_kwargs is not None and (args.arch != TIMM or not isinstance(args.model_kwargs, dict)):
        p.error("--model-kwargs must be a JSON object, with --arch timm")
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if args.optimizer == "sgd" else 0.05
    return args


def build_model(args: argparse.Namespace) -> nn.Module:
    if args.arch != TIMM:
        return ARCHS[args.arch](width=args.width, num_classes=10, in_channels=1)
    import timm

    kwargs = {"in_chans": 1, "num_classes": 10, **(args.model_kwargs or {})}
    return timm.create_model(args.timm_model, pretrained=False, **kwargs)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def make_scheduler(optimizer, args: argparse.Namespace, total_steps: int, steps_per_epoch: int):
    if args.schedule == "onecycle":
        # One-cycle: a short warm-up then annealing to ~0 gets most of the accuracy in a few epochs.
        # OneCycleLR divides by the length of each phase, so tiny smoke-test runs need at least two
        # warm-up steps and one annealing step; real runs keep the 25% warm-up.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=max(0.25, 2 / total_steps)
        )
    warmup = min(max(1, round(args.warmup_epochs * steps_per_epoch)), total_steps - 1)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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

    model = build_model(args)
    n_params = count_params(model)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    optimizer = make_optimizer(model, args)
    total_steps = args.epochs * steps_per_epoch
    if total_steps < 4:
        raise SystemExit(f"need at least 4 optimiser steps for the learning-rate schedule, got {total_steps}")
    scheduler = make_scheduler(optimizer, args, total_steps, steps_per_epoch)
    label = f"{args.arch} width={args.width}" if args.arch != TIMM else f"timm {args.timm_model} {args.model_kwargs or {}}"
    print(f"{label}: {n_params} parameters, {len(x_train)} train images, "
          f"{steps_per_epoch} steps/epoch", flush=True)

    t_start = time.perf_counter()
    test_acc = 0.0
    history = []
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        test_acc = evaluate(model, x_test, y_test)
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": round(loss_sum / len(x_train), 4),
                        "train_accuracy": round(correct / len(x_train), 4), "test_accuracy": test_acc,
                        "seconds": round(seconds, 1)})
        print(f"epoch {epoch}/{args.epochs}  loss {loss_sum / len(x_train):.4f}  "
              f"train acc {correct / len(x_train):.4f}  test acc {test_acc:.4f}  "
              f"{seconds:.1f}s", flush=True)
    wall = time.perf_counter() - t_start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    meta = {
        "arch": args.arch,
        "width": args.width if args.arch != TIMM else None,
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_images": len(x_train),
        "test_accuracy": test_acc,
        "test_images": len(x_test),
        "num_params": n_params,
        "wall_time_s": round(wall, 1),
        "torch_version": torch.__version__,
        "command": shlex.join(["python", *sys.argv] if argv is None else ["python", SCRIPT, *argv]),
    }
    if args.arch == TIMM:
        import timm

        meta.update(timm_model=args.timm_model, timm_version=timm.__version__,
                    model_kwargs={"in_chans": 1, "num_classes": 10, **(args.model_kwargs or {})})
    meta.update(optimizer=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule,
                label_smoothing=args.label_smoothing, threads=torch.get_num_threads(), history=history)
    if args.schedule == "cosine":
        meta["warmup_epochs"] = args.warmup_epochs
    if args.clip_grad is not None:
        meta["clip_grad"] = args.clip_grad
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f} on {len(x_test)} images; saved {args.out} ({wall:.0f}s)", flush=True)
    return meta


if __name__ == "__main__":
    main()
