"""Segmentation: mIoU scorer voting, DDRNet cut == removal, and `cswap prune` on a tiny
Cityscapes-layout folder read by mmseg's own dataset code. Needs the `[seg]` extra."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cswap.causal import PairedTTest
from cswap.scorers.miou import IoUScorer
from cswap.tasks.cityscapes_fixture import BUILDING, CAR, DDRNET, ROAD, SKY, TINY  # the fixture's, shared


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
@pytest.fixture()
def cityscapes(tmp_path):
    from cswap.tasks.cityscapes_fixture import write_folder

    return write_folder(tmp_path / "cityscapes")  # the generator of `cswap fixture cityscapes`


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
    cfg = yaml.safe_load(Path("configs/ddrnet23s_cityscapes.yaml").read_text())
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
    # no data here: the probe runs the example input, scaled to the nominal |S| (M_k x 19 classes)
    assert "sample set |S| <= 152 samples (nominal)" in out and "engine     staged" in out
    assert "over the example input scaled to the nominal |S| (no data here)" in out and "estimate   analysis about" in out


# ---- one mmseg config setting; the labelIds-only mistake named -----------------------------
def _config_with_normalisation(tmp_path, mean, std) -> str:
    """A user's mmseg config, as YAML (data: read with the safe loader, no opt-in needed): the
    shipped DDRNet one as its `_base_`, with another data_preprocessor merged onto it."""
    path = tmp_path / "my_ddrnet.yaml"
    path.write_text(yaml.safe_dump({"_base_": [DDRNET], "data_preprocessor": {"mean": mean, "std": std},
                                    "model": {"data_preprocessor": {"mean": mean, "std": std}}}))
    return str(path)


def test_model_config_alone_sets_the_task_normalisation(mmseg, cityscapes, tmp_path, caplog):
    from cswap.build import analysis_from_config
    from cswap.config import load_config
    from cswap.tasks.cityscapes_fixture import fixture_config

    mine = _config_with_normalisation(tmp_path, [10.0, 20.0, 30.0], [2.0, 4.0, 8.0])
    cfg = fixture_config(weights="absent.pth", root=str(cityscapes))
    cfg["model"]["kwargs"]["config"] = mine  # model.kwargs.config only: task.options.config unset
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    a, _ = analysis_from_config(load_config(tmp_path / "c.yaml"), random_if_missing=True, on_device=False)
    got = a.task.load("val", [0])[0]
    default = registry_task(cityscapes).load("val", [0])[0]  # DDRNet's Cityscapes statistics
    shipped_mean, shipped_std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    pixels = default * shipped_std.view(1, 3, 1, 1) + shipped_mean.view(1, 3, 1, 1)
    expected = (pixels - torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-5)  # pixels 0..255 undone in fp32
    # naming a task config that normalises differently is said, and the task's is used
    task = registry_task(cityscapes, config=DDRNET)
    import logging

    logger = logging.getLogger("cswap")  # the CLI's console set-up stops propagation: listen on it directly
    logger.addHandler(caplog.handler)
    try:
        task.bind_model(a.model)
    finally:
        logger.removeHandler(caplog.handler)
    assert "normalises images differently from the model's mmseg config" in caplog.text
    torch.testing.assert_close(task.load("val", [0])[0], default)


def registry_task(root, **options):
    from cswap import registry

    return registry.create("tasks", "segmentation", {"root": str(root), "scale": None, **options})


def test_label_ids_only_names_the_conversion(mmseg, cityscapes, capsys, tmp_path):
    from cswap.errors import DataError

    for path in (cityscapes / "gtFine" / "val").rglob("*_labelTrainIds.png"):  # as downloaded: labelIds only
        path.rename(path.with_name(path.name.replace("_labelTrainIds.png", "_labelIds.png")))
    with pytest.raises(DataError, match=r"4 of 4 images of split 'val' have no label map .*_gtFine_labelTrainIds\.png"
                                         r".*only .*_gtFine_labelIds\.png is there.*csCreateTrainIdLabelImgs"):
        registry_task(cityscapes).dataset("val")
    # from the command line: one line, exit status 2
    from cswap.cli import main
    from cswap.tasks.cityscapes_fixture import fixture_config

    cfg = fixture_config(root=str(cityscapes))
    del cfg["model"]["weights"]  # random weights: the error comes before any analysis
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prune", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "random weights" in err[0]  # the console's warning, then the error
    assert err[1].startswith("error: ") and f"CITYSCAPES_DATASET={cityscapes} csCreateTrainIdLabelImgs" in err[1]


# ---- the pruned model back in mmseg ---------------------------------------------------------
def _image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((64, 128, 3)) * 255).astype(np.uint8)  # HWC, as mmseg reads files


def _assert_back_in_mmseg(pruned, folder, unpruned_params: int) -> None:
    """`folder` holds the mmseg checkpoint + config of `pruned`: mmseg's inference runs on the
    pruned SegLogits and on the segmentor rebuilt from those files, with equal logits; the
    rebuilt one has the pruned widths and computes what the pruned model computes."""
    from mmseg.apis import inference_model

    from cswap.models.mmseg import CHECKPOINT, CONFIG, SegLogits, init_pruned_model

    checkpoint = torch.load(folder / CHECKPOINT, weights_only=True)
    assert checkpoint["meta"]["pruned_by"] == "C-SWAP" and len(checkpoint["meta"]["dataset_meta"]["classes"]) == 19
    # stock mmseg reads the written config (JSON, data) and refuses loudly instead of building the
    # unpruned widths around the pruned checkpoint (issue 28 item 4)
    from mmseg.apis import init_model

    with pytest.raises(KeyError, match=r"PrunedByCSwap .*init_pruned_model\(config, checkpoint\) from cswap/models"):
        init_model(str(folder / CONFIG), str(folder / CHECKPOINT), device="cpu")
    rebuilt = init_pruned_model(folder / CONFIG, folder / CHECKPOINT)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in pruned.parameters()) < unpruned_params
    x = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(SegLogits(rebuilt)(x), pruned(x), atol=0, rtol=0)
    theirs = inference_model(rebuilt, _image())
    pruned.cfg = rebuilt.cfg  # the written config's test pipeline follows the run: compare under that one
    ours = inference_model(pruned, _image())
    assert ours.pred_sem_seg.data.shape == (1, 64, 128) and ours.seg_logits.data.shape == (19, 64, 128)
    torch.testing.assert_close(ours.seg_logits.data, theirs.seg_logits.data, atol=0, rtol=0)
    assert rebuilt.dataset_meta["classes"][0] == "road"


def test_pruned_ddrnet_goes_back_to_mmseg(mmseg, one_thread, tmp_path):
    from cswap.discovery import discover
    from cswap.interfaces import Unit
    from cswap.removal import prune_units

    from conftest import randomize_batchnorm

    model = randomize_batchnorm(_ddrnet(TINY))
    x = torch.randn(1, 3, 64, 128)
    graph = discover(model, x)
    g = torch.Generator().manual_seed(0)  # half of every layer's channels removed
    units = [Unit(l.name, c) for l in graph.layers for c in torch.randperm(l.channels, generator=g)[: l.channels // 2].tolist()]
    pruned = prune_units(copy.deepcopy(model), x, units)
    files = pruned.save_native(tmp_path)
    assert sorted(p.name for p in files) == ["mmseg_config.json", "mmseg_pruned.pth"]
    _assert_back_in_mmseg(pruned, tmp_path, sum(p.numel() for p in model.parameters()))
    # the unpruned model is an mmseg model too, and its segmentor holds the very same modules
    from mmseg.apis import inference_model

    assert inference_model(model, _image()).seg_logits.data.shape == (19, 64, 128)
    assert model.segmentor().backbone is model.backbone


def test_run_directory_of_the_fixture_goes_back_to_mmseg(mmseg, one_thread, tmp_path, capsys):
    """`cswap fixture cityscapes`, then `cswap prune` on its config: the run directory's
    pruned model works in mmseg, and its mmseg checkpoint rebuilds it (about 17 s)."""
    from cswap import load_pruned
    from cswap.cli import main

    assert main(["fixture", "cityscapes", str(tmp_path / "fx"), "--train-steps", "10"]) == 0
    assert "cswap prune" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["prune", str(tmp_path / "fx" / "config.yaml"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    pruned = load_pruned(out)
    assert sum(p.numel() for p in pruned.parameters()) == report["after"]["params"]
    _assert_back_in_mmseg(pruned, out, report["before"]["params"])
    # the written config evaluates what the run evaluated: its data root, split and (no) resize
    written = json.loads((out / "mmseg_config.json").read_text())
    root = str((tmp_path / "fx" / "cityscapes").resolve())
    assert written["data_root"] == written["test_dataloader"]["dataset"]["data_root"] == root
    assert written["test_dataloader"]["dataset"]["data_prefix"] == {"img_path": "leftImg8bit/val",
                                                                     "seg_map_path": "gtFine/val"}
    assert [step["type"] for step in written["test_pipeline"]] == ["LoadImageFromFile", "LoadAnnotations",
                                                                    "PackSegInputs"]


# ---- issue 25: bad data and configs are one line, named -------------------------------------
def test_bad_label_maps_and_normalisation_are_named(mmseg, cityscapes, tmp_path):
    from PIL import Image

    from cswap.errors import DataError

    maps = sorted((cityscapes / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    good = np.array(Image.open(maps[1]))
    bad = good.copy()
    bad[5, 7] = 77  # neither a class (0..18) nor the ignore index
    Image.fromarray(bad).save(maps[1])
    task = registry_task(cityscapes)
    index = next(i for i in range(4) if task.dataset("val").get_data_info(i)["seg_map_path"] == str(maps[1]))
    task.load("val", [j for j in range(4) if j != index])  # the other frames load
    with pytest.raises(DataError, match=rf"label map {maps[1]} .*holds label 77, which is neither one of the 19"):
        task.load("val", range(4))
    Image.fromarray(good[:32]).save(maps[1])  # half the height of its image
    with pytest.raises(DataError, match=rf"label map {maps[1]} .*has shape \(1, 32, 128\), not one channel of its "
                                        r"image's size \(64, 128\)"):
        registry_task(cityscapes).load("val", [index])
    zero_std = tmp_path / "zero_std.yaml"
    zero_std.write_text(yaml.safe_dump({"data_preprocessor": {"mean": [0, 0, 0], "std": [0, 0, 0]}}))
    with pytest.raises(DataError, match=r"is not finite after normalisation: check the mmseg config's data_prepro"):
        registry_task(cityscapes, config=str(zero_std)).load("val", [0])


def test_cfg_options_that_break_the_segmentor_are_one_line(mmseg):
    from cswap.errors import ConfigError, ModelError

    with pytest.raises(ConfigError, match=r"model.backbone is None; an EncoderDecoder needs a backbone"):
        _ddrnet({"model.backbone": None})
    with pytest.raises(ConfigError, match=r"model.decode_head is None"):
        _ddrnet({"model": {"_delete_": True, "type": "EncoderDecoder", "backbone": {"type": "DDRNet"}}})
    with pytest.raises(ModelError, match=r"mmseg cannot build the segmentor of .*: TypeError"):
        _ddrnet({**TINY, "model.backbone.channels": "abc"})
