"""Which process this is under torch.distributed (torchrun), for the parts that care.

The sample set is sharded over ranks (every rank scores every world-th batch of S) and only
rank 0 writes files; outside torch.distributed this process is rank 0 of 1.
"""
from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank_and_world()[0] == 0
