"""Segmentation: mIoU scorer voting, DDRNet cut == removal, and `cswap prune` on a tiny
Cityscapes-layout folder read by mmseg's own dataset code. Needs the `[seg]` extra."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from cswap.causal import PairedTTest
from cswap.scorers.miou import IoUScorer

ROAD, BUILDING, SKY, CAR = 0, 2, 10, 13  # Cityscapes train ids
PALETTE = {ROAD: (128, 64, 128), BUILDING: (70, 70, 70), SKY: (70, 130, 180), CAR: (0, 0, 142)}
DDRNET = "ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024.py"
# the real mmseg DDRNet code at a quarter of DDRNet-23-slim's width, so a full run takes seconds
TINY = {"model.backbone.channels": 4, "model.backbone.ppm_channels": 8,
        "model.decode_head.in_channels": 16, "model.decode_head.channels": 8}


# ---- the mIoU scorer's two votes, on constructed cases with a known verdict ----------------
def _logits(pred: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, classes).permute(0, 3, 1, 2).float()


def _scenes(n: int = 12, seed: int = 0):
    """Label maps 16x16: class 0 top, 1 middle, 2 bottom; predictions = labels with a few
    random wrong pixels (class 3, never in the ground truth), so scores vary per image."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, 16, 16, dtype=torch.long)
    target[:, 5:10], target[:, 10:] = 1, 2
    pred = target.clone()
    noise = torch.rand(n, 16, 16, generator=g) < 0.05
    pred[noise] = 3
    return target, pred, g


def test_per_class_voting_flags_only_the_destroyed_class():
    target, pred, g = _scenes()
    scorer, test = IoUScorer(), PairedTTest(PairedTTest.Options(voting="per_class"))
    base = scorer.score(_logits(pred, 4), target)
    assert sorted(set(base.groups.tolist())) == [0, 1, 2] and len(base.values) == 3 * len(target)
    # the intervention erases class 1 (a varying share of its pixels becomes class 3) in every
    # image; classes 0 and 2 keep exactly their IoU, since class 3 is in no ground truth
    hurt = pred.clone()
    erase = (target == 1) & (torch.rand(target.shape, generator=g) < torch.rand(len(target), 1, 1, generator=g) * 0.5 + 0.4)
    hurt[erase] = 3
    star = scorer.score(_logits(hurt, 4), target)
    np.testing.assert_array_equal(star.groups, base.groups)  # the layout depends on the targets only
    decision = test.decide(base.values, star.values[None], base.groups)[0]
    assert decision.category == "critical" and decision.significant == [1]
    assert decision.p_values[0] == decision.p_values[2] == 1.0
    # the same intervention on a copy of the logits that changes nothing is neutral
    same = scorer.score(_logits(pred, 4), target)
    assert test.decide(base.values, same.values[None], base.groups)[0].category == "neutral"


def test_per_region_voting_flags_only_the_damaged_region():
    target, pred, g = _scenes()
    target[:, :8, :8] = 255  # top-left region unlabelled: no observation for region 0
    scorer = IoUScorer(IoUScorer.Options(voting="per_region", grid=(2, 2)))
    test = PairedTTest(PairedTTest.Options(voting="per_class"))  # votes over the scorer's groups
    base = scorer.score(_logits(pred, 4), target)
    assert sorted(set(base.groups.tolist())) == [1, 2, 3] and len(base.values) == 3 * len(target)
    # damage the bottom-right region (index 3) only, by a different amount in each image
    hurt = pred.clone()
    share = torch.rand(len(target), 1, 1, generator=g) * 0.5 + 0.3
    hurt[:, 8:, 8:][torch.rand(len(target), 8, 8, generator=g) < share] = 3
    worse = test.decide(base.values, scorer.score(_logits(hurt, 4), target).values[None], base.groups)[0]
    assert worse.category == "critical" and worse.significant == [3]
    # repairing the noise in that region only is significant there, and beneficial
    fixed = pred.clone()
    fixed[:, 8:, 8:] = target[:, 8:, 8:]
    better = test.decide(base.values, scorer.score(_logits(fixed, 4), target).values[None], base.groups)[0]
    assert better.category == "detrimental" and better.significant == [3] and better.xi > 0


def test_scorer_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same size"):
        IoUScorer().score(torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 4, dtype=torch.long))


# ---- everything below needs mmsegmentation ------------------------------------------------
@pytest.fixture(scope="module")
def mmseg():
    return pytest.importorskip("mmseg", reason="the segmentation extra is not installed: pip install -e '.[seg]'")



def _ddrnet(options=None):
    from cswap.models.mmseg import build_mmseg_model

    return build_mmseg_model(DDRNET, options)


def test_ddrnet_cut_equals_removal_and_pruned_model_runs(mmseg, one_thread):
    from cswap.discovery import discover
    from cswap.interfaces import Unit
    from cswap.intervention import Intervention
    from cswap.removal import prune_units

    from conftest import randomize_batchnorm

    model = randomize_batchnorm(_ddrnet())
    x = torch.randn(1, 3, 64, 128)
    graph = discover(model, x)
    assert len(graph.layers) == 30 and graph.num_units == 3840
    assert "decode_head.conv_seg" in graph.skipped and all("conv_seg" not in l.name for l in graph.layers)
    names = {l.name for l in graph.layers}
    assert {"backbone.compression_1.conv", "backbone.down_2.1.conv", "backbone.spp.compression.conv"} <= names
    g = torch.Generator().manual_seed(0)
    # one random channel of every layer, then half of every layer, cut at once vs removed at once
    picks = [[Unit(l.name, int(torch.randint(l.channels, (1,), generator=g))) for l in graph.layers],
             [Unit(l.name, c) for l in graph.layers for c in torch.randperm(l.channels, generator=g)[: l.channels // 2].tolist()]]
    for dtype in (torch.float32, torch.float64):
        net, inp = copy.deepcopy(model).to(dtype), x.to(dtype)
        for units in picks:
            cut_model = copy.deepcopy(net)
            cut = Intervention(cut_model, graph)
            for u in units:
                cut.cut(u)
            pruned = prune_units(copy.deepcopy(net), inp, units)
            with torch.no_grad():
                a, b = cut_model(inp), pruned(inp)
            assert b.shape == (1, 19, 64, 128)
            assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
            # fp32 agrees to round-off relative to the output scale; fp64 shows it is exact
            scale = max(1.0, a.abs().max().item())
            atol = 1e-5 * scale if dtype == torch.float32 else 1e-10 * scale
            torch.testing.assert_close(b, a, atol=atol, rtol=0)


def test_ddrnet_adapter_stage_chain_equals_model(mmseg, one_thread):
    from cswap import registry

    from conftest import randomize_batchnorm

    model = randomize_batchnorm(_ddrnet(TINY))
    adapter = registry.create("adapters", "ddrnet")
    assert adapter.matches(model) and not adapter.matches(torch.nn.Linear(2, 2))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        state = x
        for stage in adapter.stages(model):
            state = stage(state)
        torch.testing.assert_close(state, model(x), atol=0, rtol=0)


# ---- a tiny Cityscapes folder through mmseg's dataset code and `cswap prune` --------------
def _write_cityscapes(root, split: str, n: int, seed: int) -> None:
    """n frames 64x128: sky, building and road bands at random heights, a car on the road in
    every other frame, a strip of ignore (255) pixels, colours from the Cityscapes palette
    plus noise. Files follow the Cityscapes layout and names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        city = ("aachen", "bochum")[i % 2]
        label = np.full((64, 128), ROAD, dtype=np.uint8)
        sky_end, building_end = rng.integers(10, 22), rng.integers(30, 42)
        label[:sky_end], label[sky_end:building_end] = SKY, BUILDING
        if i % 2 == 0:
            x0 = rng.integers(0, 80)
            label[46:58, x0:x0 + rng.integers(20, 40)] = CAR
        label[-2:] = 255
        rgb = np.zeros((64, 128, 3), dtype=np.float64)
        for k, colour in PALETTE.items():
            rgb[label == k] = colour
        rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
        for folder, suffix, array in (("leftImg8bit", "leftImg8bit", rgb), ("gtFine", "gtFine_labelTrainIds", label)):
            path = root / folder / split / city / f"{city}_{i:06d}_000019_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


@pytest.fixture()
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    _write_cityscapes(root, "train", 8, seed=0)
    _write_cityscapes(root, "val", 4, seed=1)
    return root


def test_task_reads_cityscapes_layout_with_mmseg(mmseg, cityscapes):
    from cswap import registry

    task = registry.create("tasks", "segmentation", {"root": str(cityscapes), "samples_per_class": 3, "scale": None})
    assert type(task.dataset("train")).__name__ == "CityscapesDataset" and len(task.dataset("train")) == 8
    with pytest.warns(UserWarning, match="appear in no image"):
        s1, s2 = task.manifold(seed=0), task.manifold(seed=0)
    assert s1.class_counts[CAR] == 3 and all(n >= 3 for n in s1.class_counts.values())
    assert set(s1.class_counts) == {ROAD, BUILDING, SKY, CAR}
    images, labels = s1.batches[0]
    assert images.shape[1:] == (3, 64, 128) and labels.shape[1:] == (64, 128) and labels.dtype == torch.long
    torch.testing.assert_close(images, s2.batches[0][0])  # seeded
    assert (labels == 255).any() and abs(images.mean().item()) < 3  # ignore pixels kept, normalised
    with pytest.raises(Exception, match=r"class 13 \(car\) appears in 4 images.*samples_per_class=5"):
        registry.create("tasks", "segmentation", {"root": str(cityscapes), "samples_per_class": 5}).manifold(0)


def test_cswap_prune_runs_on_tiny_cityscapes(mmseg, cityscapes, tmp_path, one_thread, capsys):
    from cswap import registry
    from cswap.cli import main

    # a few seconds of training (BN frozen at its initial statistics, the wrapper is eval-only)
    # so the analysis sees a model that segments: mIoU about 0.6 on the fixture
    task = registry.create("tasks", "segmentation", {"root": str(cityscapes), "scale": None})
    images, labels = task.load("train", range(8))
    torch.manual_seed(0)
    model = _ddrnet(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255).backward()
        opt.step()
    weights = tmp_path / "ddrnet_tiny.pth"  # an mmseg-style checkpoint: {"meta", "state_dict"}
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": model.state_dict()}, weights)
    cfg = yaml.safe_load(open("configs/ddrnet23s_cityscapes.yaml"))
    cfg["model"]["kwargs"]["cfg_options"] = TINY
    cfg["model"]["weights"] = str(weights)
    cfg["task"]["options"].update(root=str(cityscapes), samples_per_class=3, min_pixels=1, scale=None)
    cfg["pruning"]["params_ratio"] = 0.3
    cfg["output"].update(dir=str(tmp_path / "runs"), latency_repeats=2)
    path = tmp_path / "tiny_seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["prune", str(path), "--out", str(out), "--quiet"]) == 0
    assert "mIoU" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"] == "ddrnet"
    assert report["params_removed_ratio"] >= 0.3 and report["self_check_max_abs_diff"] < 1e-4
    assert report["before"]["mIoU"] > 0.3 and 0 <= report["after"]["mIoU"] <= 1
    assert report["before"]["eval_samples"] == 4
    assert sum(report["categories"].values()) == 440 and report["categories"]["critical"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert all("conv_seg" not in s["unit"] for s in plan["steps"])


def test_shipped_config_dry_run_without_checkpoint_or_data(mmseg, capsys):
    from cswap.cli import main

    # a small `scale` keeps tracing quick; the shipped scale is Cityscapes' native 2048x1024
    assert main(["prune", "configs/ddrnet23s_cityscapes.yaml", "--dry-run", "--set", "task.options.scale=[256, 128]"]) == 0
    out = capsys.readouterr().out
    assert "random initialisation: weight file" in out and "is absent" in out
    assert "adapter    ddrnet" in out and "3840 in 30 layers" in out and "decode_head.conv_seg" in out
