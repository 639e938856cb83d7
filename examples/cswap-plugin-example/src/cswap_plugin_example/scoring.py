"""A scoring function: the true-class probability of temperature-scaled logits.

A confident model puts p_y near 1 on most samples, where every intervention moves it by a
tiny but consistent amount, which a paired t-test calls significant. Dividing the logits by
T > 1 spreads the probabilities out, so sigma reacts to changes that matter for the ranking
of classes rather than to saturation noise.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from cswap.interfaces import Scores, ScoringFunction


class TemperedProbability(ScoringFunction):
    higher_is_better = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = Field(2.0, gt=0)

    def __init__(self, options: "TemperedProbability.Options | None" = None, **_):
        self.options = options or self.Options()

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        logp = torch.log_softmax(outputs.detach().double() / self.options.temperature, dim=1)
        values = logp.gather(1, targets.view(-1, 1).long()).squeeze(1).exp()
        return Scores(values.cpu().numpy(), targets.cpu().numpy().astype(np.int64))
