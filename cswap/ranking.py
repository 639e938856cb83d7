"""Global rankings: one order over every unit of the model, as the paper's baselines use.

A one-shot criterion scores each unit once on the unpruned model (higher = more important)
and removes units from the least to the most important, *globally* across layers. Scales
differ between layers for most scores (a gradient at the stem is not comparable with one at
the last block), so the option `normalize: layer` divides every score by the mean |score| of
its layer first; it is an option because the paper ranks raw scores, and the benchmark
reports both. Ties (a dead unit scores 0 under most criteria) are broken by a seeded
permutation, so the seed changes only what the scores leave undecided.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import ModelError
from .interfaces import RANKED, PlanStep, Unit, UnitGraph


class RankingOptions(BaseModel):
    """Options every global ranking has."""

    model_config = ConfigDict(extra="forbid")
    normalize: Literal["none", "layer"] = "none"


def normalize_layer(values: np.ndarray) -> np.ndarray:
    """Divide by the layer's mean |score| so every layer's scores average 1 in magnitude."""
    scale = np.abs(values).mean()
    return values / scale if scale > 0 else values


def rank_globally(per_layer: dict[str, np.ndarray], graph: UnitGraph, seed: int,
                  normalize: str = "none") -> list[PlanStep]:
    """Steps for every unit, least important first; ties in a seeded random order."""
    units: list[Unit] = []
    values: list[float] = []
    for layer in graph.layers:
        if layer.name not in per_layer:
            raise ModelError(f"no scores for layer {layer.name!r}")
        v = np.asarray(per_layer[layer.name], dtype=np.float64).reshape(-1)
        if v.shape[0] != layer.channels:
            raise ModelError(f"layer {layer.name!r}: {v.shape[0]} scores for {layer.channels} channels")
        if not np.isfinite(v).all():
            raise ModelError(f"layer {layer.name!r}: non-finite importance scores")
        if normalize == "layer":
            v = normalize_layer(v)
        units += layer.units()
        values += v.tolist()
    order = np.random.default_rng(seed).permutation(len(units))
    order = order[np.argsort(np.asarray(values)[order], kind="stable")]
    return [PlanStep(units[i], RANKED, score=float(values[i])) for i in order]
