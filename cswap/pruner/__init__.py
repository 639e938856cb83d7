"""Algorithm 1 of the paper (progressive C-SWAP) and the parts it calls.

    algorithm.py    the exact loop, short enough to read beside the paper
    walk.py         what the loop talks to: remaining units, tests, removals
    trials.py       sigma* of a cut (the engine), the test, the baseline sigma
    record.py       decisions: checkpoints, resume/replay, the ranking's two parts
    speculation.py  several units per pass (unit_batch), exact
    fast.py         opt-in shortcuts: group testing, sequential looks, Taylor ordering
    progress.py     one progress bar counted in units
    run.py          progressive_prune: the entry point (restarts on out-of-memory)
"""
from .run import progressive_prune

__all__ = ["progressive_prune"]
