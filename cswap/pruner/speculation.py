"""Several single-unit trials per pass (`pruning.unit_batch`), used speculatively and exactly.

Algorithm 1 tests unit i+1 on the network left after unit i's verdict. While verdicts keep
units, the network does not change and results computed ahead for the next units of the
layer stay exact; a removal changes it, and everything computed ahead is thrown away.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from ..engine import FullForward
from ..interfaces import Scores, Unit

log = logging.getLogger("cswap")


class Speculation:
    """Scores of single-unit trials computed k at a time for the network as it stands.

    Algorithm 1 tests unit i+1 on the network left after unit i's verdict. While verdicts
    keep units, the network does not change and results computed ahead stay exact; a removal
    changes it, and `network_changed` throws the rest away. The first batched result of an
    analysis is compared bitwise with an ordinary trial of the same unit; if the kernels make
    them differ, batching is switched off and the analysis continues unbatched (warned).
    """

    MAX_AUTO = 16

    def __init__(self, engine: FullForward, unit_batch: int | str, device):
        self.engine = engine
        self.k = self._size(unit_batch, device)
        self.ready: dict[Unit, Scores] = {}
        self.checked = False
        self.stats = {"batches": 0, "units": 0, "thrown_away": 0}

    def _size(self, unit_batch: int | str, device) -> int:
        """k for this device and engine (`AnalysisOptions` has validated `unit_batch`)."""
        if unit_batch == "auto":
            if torch.device(device).type != "cuda" or not self.engine.can_batch:
                return 1
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return max(1, min(self.MAX_AUTO, int(0.5 * free // max(1, self._cache_bytes()))))
        if unit_batch > 1 and not self.engine.can_batch:
            log.warning("unit_batch needs the staged engine; evaluating one unit at a time")
            return 1
        return unit_batch

    def _cache_bytes(self) -> int:
        """Memory of the engine's cached activations of S: a bound on what one more copy holds."""
        tensors = [t for per_batch in self.engine.inputs for t in per_batch]
        tensors += [t for per_batch in self.engine.outputs for t in per_batch.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def applies(self, layer: str) -> bool:
        return self.k > 1 and self.engine.batchable(layer)

    def scores(self, unit: Unit, upcoming: list[Unit], single) -> Scores:
        """sigma* of `unit` alone, from a batch with the next units of its layer if needed.
        `single()` runs the ordinary trial (weights cut), used for the one-time check."""
        if unit in self.ready:
            return self.ready.pop(unit)
        reference = None if self.checked else single()
        block = [unit] + upcoming[:self.k - 1]
        while True:
            try:
                results = self.engine.trials(block)
                break
            except torch.OutOfMemoryError:
                if len(block) == 1:
                    raise
                block = block[:len(block) // 2]
                self.k = len(block)
                log.warning("out of memory evaluating units together; now %d at a time", self.k)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.stats["batches"] += 1
        self.stats["units"] += len(block)
        self.ready = dict(zip(block, results))
        if reference is not None:
            self.checked = True
            if not np.array_equal(reference.values, self.ready[unit].values):
                msg = "batched trials differ from single trials in round-off on this device; unit_batch switched off"
                log.warning(msg)
                warnings.warn(msg)
                self.k, self.ready = 1, {}
                return single()
        return self.ready.pop(unit)

    def network_changed(self) -> None:
        self.stats["thrown_away"] += len(self.ready)
        self.ready = {}

    def summary(self) -> str:
        st = self.stats
        return (f"; unit_batch {self.k}: {st['units']} unit trials in {st['batches']} batched passes, "
                f"{st['thrown_away']} thrown away after removals")
