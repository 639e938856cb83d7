"""Training a `DenseDetector` with torchvision's own losses: how the benchmarks and tests make
a small trained detector to prune. Never part of an analysis (C-SWAP does not train)."""
from __future__ import annotations

import torch

from .detection import DenseDetector


def train_detector(model: DenseDetector, images: torch.Tensor, targets: torch.Tensor, steps: int = 100,
                   lr: float = 3e-3, batch_size: int = 16, seed: int = 0, log_every: int = 0) -> DenseDetector:
    """Train with torchvision's own losses (focal + box regression) through a torchvision
    detector that shares the wrapper's modules. `targets`: (N, B, 5) rows (label, x1, y1,
    x2, y2), label -1 on padding, as the detection task builds them. Returns it in eval mode."""
    detector = model.torchvision_model().train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randperm(len(images), generator=g)[:batch_size]
        batch = [{"boxes": t[t[:, 0] >= 0, 1:], "labels": t[t[:, 0] >= 0, 0].long()} for t in targets[idx]]
        losses = detector(list(images[idx]), batch)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()), flush=True)
    return model.eval()
