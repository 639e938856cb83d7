"""Shared fixtures: tiny models trained for a few seconds on synthetic data, so the causal
statistics see real structure (critical, neutral and detrimental units) without any download."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cswap.models.cifar_resnet import cifar_resnet8

# The test models are tiny: one thread is as fast as two and does not fight other processes
# (on a loaded 2-core machine two threads per process were measured 10-40x slower).
# Subprocesses started by tests (the CLI, torchrun) inherit the variable.
# CSWAP_TEST_THREADS sets torch's intra-op threads for the whole suite (default 1): another
# thread count changes how reductions are split, so float round-off differs as it does on
# other machines, and the suite must pass under it (`.ci/run` runs the numerics-sensitive
# tests a second time that way).
os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_THREADS = int(os.environ.get("CSWAP_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that outputs are
    O(1) and an intervention that wrongly handled a BN channel would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def blobs(n_per_class: int, classes: int = 3, dim: int = 8, seed: int = 0):
    """Gaussian blobs: an easy but not trivial classification problem."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    x = torch.cat([centers[k] + torch.randn(n_per_class, dim, generator=g) for k in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def patterns(n_per_class: int, classes: int = 3, size: int = 8, seed: int = 0):
    """Noisy images of horizontal bars, vertical bars and a diagonal: one per class."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(classes, 1, size, size)
    base[0, 0, ::2, :] = 1
    if classes > 1:
        base[1, 0, :, ::2] = 1
    if classes > 2:
        base[2, 0] = torch.eye(size)
    x = torch.cat([base[k].expand(n_per_class, 1, size, size) + 0.8 * torch.randn(n_per_class, 1, size, size, generator=g)
                   for k in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 0.01, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def small_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def small_cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


@pytest.fixture(scope="session")
def trained_mlp():
    x, y = blobs(40)
    return train(small_mlp(), x, y, steps=150), x, y


@pytest.fixture(scope="session")
def trained_cnn():
    """Small trained CNN with two dead channels (exactly neutral) and one channel whose
    outgoing weights are negated (its removal should help: detrimental)."""
    x, y = patterns(40)
    model = train(small_cnn(), x, y, steps=120)
    with torch.no_grad():
        model[1].bias[[0, 3]] = -10.0  # ReLU(BN(.)) == 0: dead channels of the first conv
        model[8].weight[:, 2] *= -1.0  # the second conv's channel 2 now argues for wrong classes
    return model, x, y


@pytest.fixture()
def npz_dataset(tmp_path):
    """A tiny 1x12x12 image dataset in the npz layout the classification task reads."""
    rng = np.random.default_rng(0)
    x, y = patterns(30, size=12, seed=3)
    imgs = (x.clamp(-1, 2).add(1).div(3).mul(255)).to(torch.uint8).squeeze(1).numpy()
    labels = y.numpy().astype(np.int64)
    perm = rng.permutation(len(labels))
    path = tmp_path / "tiny.npz"
    np.savez_compressed(path, manifold_images=imgs[perm[:60]], manifold_labels=labels[perm[:60]],
                        eval_images=imgs[perm[60:]], eval_labels=labels[perm[60:]])
    return path


@pytest.fixture()
def config(tmp_path, npz_dataset):
    """A YAML config for a tiny CIFAR ResNet-8 on the npz fixture; its checkpoint is model.pt."""
    torch.manual_seed(0)
    weights = tmp_path / "model.pt"
    torch.save(cifar_resnet8(width=4, in_channels=1, num_classes=3).state_dict(), weights)
    cfg = {
        "name": "tiny",
        "seed": 1,
        "model": {"source": "cswap", "name": "cifar_resnet8",
                  "kwargs": {"width": 4, "in_channels": 1, "num_classes": 3}, "weights": str(weights)},
        "task": {"name": "classification", "options": {
            "dataset": "npz", "root": str(npz_dataset), "manifold_split": "manifold",
            "eval_split": "eval", "samples_per_class": 12}},
        "pruning": {"params_ratio": 0.3},
        "output": {"dir": str(tmp_path / "runs"), "latency_repeats": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def one_thread():
    """The suite's thread count (one unless CSWAP_TEST_THREADS says otherwise) for the test,
    whatever a previous test set (DDRNet and detectors are hundreds of tiny ops: on 2 shared
    cores one thread is several times faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


def cswap_plan(model, task, seed: int = 0, *, test=None, scorer=None, manifold=None, adapter="auto", **options):
    """C-SWAP's plan of `model` on `task` through the core's own parts (what `cswap.analyze`
    does, with a test object of the caller's), units as the adapter gives them (unverified),
    `options` keyword arguments of `AnalysisOptions`."""
    from cswap.build import analysis_for
    from cswap.options import AnalysisOptions
    from cswap.plan import PruningPlan
    from cswap.pruner import progressive_prune

    a = analysis_for(model, task, scorer=scorer, test=test, adapter=adapter, progress=False,
                     options=AnalysisOptions(verify_units=False, **options))
    return PruningPlan.from_analysis(a, progressive_prune(a, seed, manifold=manifold))
