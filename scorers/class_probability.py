"""sigma for classification: the softmax probability of the true class (paper §3.2)."""
from __future__ import annotations

import numpy as np
import torch

from cswap.errors import DataError
from cswap.interfaces import Scores, ScoringFunction


class TrueClassProbability(ScoringFunction):
    """p_y(x) = softmax(z)_y, one observation per sample, grouped by its class.

    Computed as exp(log_softmax) in float64 so that a confident mistake gives a tiny positive
    probability rather than an underflowed 0 that would make (sigma* - sigma)/sigma undefined.
    A label outside the model's outputs is a `DataError` naming both (not an index error).
    """

    higher_is_better = True
    positive = True  # a probability in (0, 1]: the paper's relative effect applies
    is_differentiable = True

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> Scores:
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        _check_labels(outputs, targets)
        logp = torch.log_softmax(outputs.detach().to(torch.float64), dim=1)
        values = logp.gather(1, targets.view(-1, 1).long()).squeeze(1).exp()
        return Scores(values.cpu().numpy(), targets.detach().cpu().numpy().astype(np.int64))

    def differentiable(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        return torch.log_softmax(outputs, dim=1).gather(1, targets.view(-1, 1).long()).squeeze(1).exp()


def _check_labels(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if outputs.dim() != 2:
        raise DataError(f"class_probability needs class logits (N, C), the model returned shape {tuple(outputs.shape)}")
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[1]):
        raise DataError(f"labels range over {int(targets.min())}..{int(targets.max())} but the model has "
                        f"{outputs.shape[1]} outputs (labels must be 0..{outputs.shape[1] - 1}): is the model's "
                        "head made for this dataset (num_classes)?")
