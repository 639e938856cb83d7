"""The project's own causal methods, registered from the core as `cswap.criteria` entry points
(as the significance test `paired_t` is): C-SWAP itself and its causal baselines C-BP and AMP.
They drive the engine and the intervention directly; the baselines that need only the
interfaces (random, magnitude, Captum, LRP) are plugins in the top-level `criteria/` folder.
"""
