"""C-SWAP (paper Algorithm 1) as a criterion, so curves compare it with the baselines through
the same replay code. The ranking is `cswap.pruner.progressive_prune`'s, unchanged; how it
walks the network is the run's `PruningOptions` (engine, unit_batch, shuffle_units, fast)."""
from __future__ import annotations

from ..interfaces import Analysis, Criterion, Ranking
from ..pruner import progressive_prune


class CSwapCriterion(Criterion):
    name = "cswap"

    def rank(self, analysis: Analysis, seed: int) -> Ranking:
        return progressive_prune(analysis, seed)
