"""Two small CNNs trained here on data that installs offline, the models issue #27 was found on:
plain 3-convolution networks whose last convolution is read through a flatten by the
classifier, so each of its channels frees the most parameters of any unit, as in many models
users bring.

    python benchmarks/small_cnns.py            # train both (seeded; skipped when cached), print accuracy

- `digits_cnn`: widths 8/12/16 on scikit-learn's `load_digits` (8x8 images, 1,797 of them, in
  the scikit-learn wheel: `pip install scikit-learn`); a seeded, class-stratified 75/25 split,
  S drawn from the 75 %, accuracy on the 25 % (450 images).
- `fmnist_cnn`: widths 16/32/32 on Fashion-MNIST (`apt-get install dataset-fashion-mnist`, see
  benchmarks/datasets.py), trained on 15,000 train images; S from the train split, accuracy on
  1,000 test images, as the Fashion-MNIST configs of configs/ do.

Weights (a few KB) are cached in benchmarks/checkpoints/<name>.pt with a JSON sidecar holding
the settings and the accuracy; a checkpoint whose sidecar settings differ is retrained.
`analysis(name, seed)` builds the analysis benchmarks/recovery.py prunes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CHECKPOINTS = REPO_ROOT / "benchmarks" / "checkpoints"
SPECS = {  # name -> architecture and training; a changed spec retrains
    "digits_cnn": {"data": "digits", "widths": [8, 12, 16], "pool_after": [False, True, False], "size": 8,
                   "epochs": 40, "batch": 64, "lr": 3e-3, "seed": 0},
    "fmnist_cnn": {"data": "fashion_mnist", "widths": [16, 32, 32], "pool_after": [True, True, False], "size": 28,
                   "epochs": 3, "batch": 128, "lr": 3e-3, "seed": 0, "train_limit": 15000},
}
SAMPLES_PER_CLASS = 16  # M_k, as the Fashion-MNIST configs
EVAL_LIMIT = 1000


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks (max-pooled where asked), flattened into one linear classifier."""

    def __init__(self, widths=(8, 12, 16), pool_after=(False, True, False), size=8, in_channels=1, num_classes=10):
        super().__init__()
        layers, channels = [], in_channels
        for width, pool in zip(widths, pool_after):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def build(name: str) -> nn.Module:
    spec = SPECS[name]
    return SmallCNN(spec["widths"], spec["pool_after"], spec["size"])


def digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits, standardised, in a seeded class-stratified 75/25 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("digits_cnn needs scikit-learn (its wheel holds the data): pip install scikit-learn")
    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: round(0.25 * np.sum(y == c))] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    mean, std = x[train].mean(), x[train].std()
    x = torch.from_numpy((x - mean) / std).unsqueeze(1)
    y = torch.from_numpy(y)
    return {"train": (x[train], y[train]), "test": (x[np.sort(test)], y[np.sort(test)])}


def fashion_split(train_limit: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fashion-MNIST normalised as the task normalises it (train limited to a seeded subset)."""
    from benchmarks.datasets import fashion_mnist_root
    from cswap.tasks.idx_files import load_mnist_split

    root, out = fashion_mnist_root(), {}
    for split in ("train", "test"):
        images, labels = load_mnist_split(root, split)
        if split == "train" and train_limit:
            keep = np.random.default_rng(0).permutation(len(images))[:train_limit]
            images, labels = images[keep], labels[keep]
        x = (torch.from_numpy(images).float() / 255.0 - 0.2860) / 0.3530
        out[split] = (x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return out


def data(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    spec = SPECS[name]
    return digits_split() if spec["data"] == "digits" else fashion_split(spec.get("train_limit"))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)


def train(name: str) -> dict:
    """Train `name` (Adam, cosine decay, seeded, deterministic) unless a checkpoint of the same
    spec exists; return its sidecar (settings, accuracy on the full test split)."""
    spec, path = SPECS[name], CHECKPOINTS / f"{name}.pt"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("spec") == spec:
        return json.loads(sidecar.read_text())
    torch.manual_seed(spec["seed"])
    torch.use_deterministic_algorithms(True)
    splits, model = data(name), build(name)
    (x, y), gen = splits["train"], torch.Generator().manual_seed(spec["seed"])
    steps = spec["epochs"] * -(-len(x) // spec["batch"])
    optimizer = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    for _ in range(spec["epochs"]):
        model.train()
        for batch in torch.randperm(len(x), generator=gen).split(spec["batch"]):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    record = {"spec": spec, "test_accuracy": accuracy(model, *splits["test"]), "test_images": len(splits["test"][1]),
              "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.perf_counter() - started, 1),
              "torch_version": torch.__version__, "command": "python benchmarks/small_cnns.py"}
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    sidecar.write_text(json.dumps(record, indent=1) + "\n")
    return record


def analysis(name: str):
    """The analysis benchmarks/recovery.py prunes: the trained model (weights_only), its task
    (S of SAMPLES_PER_CLASS per class from the train split, accuracy on held-out images) and
    the configs' test (paired t, alpha 0.05, per class), every other option the default."""
    from cswap import registry
    from cswap.build import analysis_for
    from cswap.tasks.classification import ClassificationTask

    train(name)
    model = build(name)
    model.load_state_dict(torch.load(CHECKPOINTS / f"{name}.pt", weights_only=True))
    if SPECS[name]["data"] == "digits":
        splits = digits_split()
        task = ClassificationTask.from_tensors(*splits["train"], samples_per_class=SAMPLES_PER_CLASS,
                                               test=splits["test"])
    else:
        from benchmarks.datasets import fashion_mnist_root

        task = registry.create("tasks", "classification", {
            "dataset": "fashion_mnist", "root": str(fashion_mnist_root()), "samples_per_class": SAMPLES_PER_CLASS,
            "manifold_split": "train", "eval_split": "test", "eval_limit": EVAL_LIMIT})
    test = registry.create("tests", "paired_t", {"alpha": 0.05, "voting": "per_class"})
    return analysis_for(model, task, test=test)


def main() -> int:
    torch.set_num_threads(1)
    for name in SPECS:
        record = train(name)
        print(f"{name}: {100 * record['test_accuracy']:.2f} % on {record['test_images']} test images, "
              f"{record['params']:,} parameters, trained in {record['train_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
