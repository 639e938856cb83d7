"""Every torchvision classification builder: handled with cut == removal, or documented.

A model is handled when `adapter: auto` finds prunable layers and removing units from them
(through `cswap.replay`, as a run does) gives the same outputs as cutting them.
The models that are not are listed with the reason in docs/architectures.md, which this
test reads, so the documentation cannot drift from the code. The full matrix is slow
(hundreds of millions of parameters for the largest); a representative subset runs by default.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from cswap.errors import ModelError

from removal_check import check_cut_equals_removal, prepare

DOC = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
ALL = torchvision.models.list_models(module=torchvision.models)
# Covers: depthwise convolutions + squeeze-excitation + hardswish, stochastic depth, grouped
# convolutions left out, channel concatenation (fire modules). ViTs: tests/test_adapters.py.
DEFAULT = {"mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "squeezenet1_1"}
SIZE = {"inception_v3": 96}  # smallest input each model accepts comfortably; 64 otherwise
KWARGS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},  # the aux head needs 299 px
    **{name: {"image_size": 32} for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")},
    "vit_h_14": {"image_size": 28},
}


def unsupported() -> dict[str, str]:
    """The `| model | reason |` rows of the "Unsupported" section of docs/architectures.md."""
    text = DOC.read_text().split("## Unsupported", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`?([a-z0-9_]+)`?\s*\|\s*(.+?)\s*\|\s*$", text, flags=re.MULTILINE)
    return {name: reason for name, reason in rows if name != "model"}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))
    size = KWARGS.get(name, {}).get("image_size", SIZE.get(name, 64))
    prepare(model, torch.randn(4, 3, size, size))
    return model, torch.randn(2, 3, size, size)


def check(name: str) -> dict:
    model, x = build(name)
    return check_cut_equals_removal(model, x, per_layer=2)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT else [pytest.mark.slow]) for n in ALL])
def test_builder_is_handled_or_documented(name):
    reasons = unsupported()
    if name in reasons:
        pytest.skip(f"documented as unsupported: {reasons[name]}")
    check(name)


def test_documented_models_exist_and_most_are_handled():
    reasons = unsupported()
    assert set(reasons) <= set(ALL), f"docs list unknown models: {set(reasons) - set(ALL)}"
    assert all(len(r) > 15 for r in reasons.values()), "every unsupported model needs a reason"
    handled = len(ALL) - len(reasons)
    assert handled >= 0.8 * len(ALL), f"only {handled}/{len(ALL)} torchvision models handled"


def test_untraceable_model_fails_with_a_named_module():
    """ShuffleNetV2 is documented unsupported; the error must say where and what to do."""
    from cswap.build import resolve_adapter

    model = torchvision.models.shufflenet_v2_x0_5().eval()
    _, adapter = resolve_adapter("auto", model)
    with pytest.raises(ModelError, match=r"after module .stage\d.*Hint"):
        adapter.units(model, torch.randn(1, 3, 64, 64))
