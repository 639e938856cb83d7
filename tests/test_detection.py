"""Detection: AP on hand-computed cases, the detection_match scorer's verdicts, the dense
wrapper against torchvision's own detections, cut == removal on a detector, the task's
sample set, and `cswap prune` end to end on generated scenes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cswap import registry
from cswap.causal import PairedTTest
from cswap.models.detection import tiny_retinanet
from cswap.models.detection_training import train_detector
from cswap.scorers.detection import DetectionMatchScorer
from cswap.tasks.detection_ap import average_precision, voc_ap
from cswap.tasks.detection_scenes import write_npz

from removal_check import check_cut_equals_removal, prepare, stages_forward


def _lively(model):
    """Random head weights at O(1) gain (torchvision starts the towers at std 0.01 and the
    predictors near zero), so every unit visibly changes boxes and scores."""
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if p.dim() == 4:
                gain = 1.0 if ("cls_logits" in name or "bbox_reg" in name) else 2.0
                p.normal_(0, (gain / p[0].numel()) ** 0.5)
    return model


# ---- average precision -----------------------------------------------------------------
def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def test_average_precision_hand_computed():
    gt = [(torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([0, 0])),
          (torch.tensor([[0., 0, 10, 10]]), torch.tensor([1]))]
    # class 0: TP (0.9), FP (0.8, nowhere), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # -> all-point AP = 0.5 * 1 + 0.5 * 2/3; class 1: one perfect detection -> 1
    dets = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0]),
            _det([[0, 0, 10, 10]], [0.5], [1])]
    out = average_precision(dets, gt, num_classes=3, iou_thresholds=(0.5,))
    assert out["AP50_class0"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert out["AP50_class1"] == 1.0 and "AP50_class2" not in out  # no ground truth: not averaged
    assert out["mAP50"] == pytest.approx((0.5 + 1 / 3 + 1) / 2)
    # a duplicate of a matched box is a false positive; the box [21,21,30,30] has IoU 0.81
    strict = average_precision(dets, gt, num_classes=2, iou_thresholds=(0.5, 0.85))
    assert strict["mAP"] == pytest.approx(((0.5 + 1 / 3 + 1) / 2 + (0.5 + 1) / 2) / 2)
    assert voc_ap(np.array([]), 3) == 0.0 and voc_ap(np.array([1.0, 1.0]), 2) == 1.0


# ---- the scorer ----------------------------------------------------------------------------
def _scene_outputs(n=16, seed=0):
    """Ground truth: each image has one box of class 0, 1 and 2; the dense 'predictions' are
    the true boxes jittered, each with a varying score for its class, plus background anchors."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((n, 4, 5), -1.0)
    outputs = torch.zeros(n, 10, 4 + 3)
    for i in range(n):
        for k in range(3):
            x0, y0 = float(10 + 20 * k), float(torch.randint(0, 30, (1,), generator=g))
            box = torch.tensor([x0, y0, x0 + 15, y0 + 15])
            targets[i, k] = torch.cat([torch.tensor([float(k)]), box])
            outputs[i, k, :4] = box + torch.randn(4, generator=g)
            outputs[i, k, 4 + k] = 0.5 + 0.4 * torch.rand(1, generator=g)
        outputs[i, 3:, :4] = torch.tensor([0., 0, 5, 5])
        outputs[i, 3:, 4:] = 0.05 * torch.rand(7, 3, generator=g)
    return outputs, targets


def test_scorer_missing_one_class_is_critical_for_that_class_only():
    outputs, targets = _scene_outputs()
    scorer, test = DetectionMatchScorer(), PairedTTest(PairedTTest.Options(voting="per_class"))
    base = scorer.score(outputs, targets)
    assert base.groups.tolist() == [0, 1, 2] * 16 and ((base.values > 0.3) & (base.values <= 1)).all()
    missed = outputs.clone()
    missed[..., 4 + 1] = 0.0  # the detector no longer scores class 1 anywhere
    star = scorer.score(missed, targets)
    np.testing.assert_array_equal(star.groups, base.groups)  # layout from the targets only
    assert (star.values[base.groups == 1] == pytest.approx(1e-3))  # the floor: finite relative effect
    np.testing.assert_array_equal(star.values[base.groups != 1], base.values[base.groups != 1])
    decision = test.decide(base.values, star.values[None], base.groups)[0]
    assert decision.category == "critical" and decision.significant == [1]
    # boxes shifted off their objects lower sigma too (localisation counts, not only scores)
    shifted = outputs.clone()
    shifted[:, 2, :4] += torch.linspace(4, 8, 16)[:, None]
    assert (scorer.score(shifted, targets).values[base.groups == 2] < base.values[base.groups == 2]).all()
    # false positives are invisible by default, and penalised on request
    noisy = outputs.clone()
    noisy[:, 5, 4:] = 0.9
    np.testing.assert_array_equal(scorer.score(noisy, targets).values, base.values)
    targets_two = targets.clone()
    targets_two[:, 2] = -1  # class 2 absent from the ground truth: its scores are false positives
    penal = DetectionMatchScorer(DetectionMatchScorer.Options(false_positive_penalty=0.5))
    assert (penal.score(noisy, targets_two).values < scorer.score(noisy, targets_two).values).all()


def test_scorer_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="dense detections"):
        DetectionMatchScorer().score([{"boxes": torch.zeros(0, 4)}], torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match=r"\(label, x1, y1, x2, y2\)"):
        DetectionMatchScorer().score(torch.zeros(1, 4, 7), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="not below"):
        DetectionMatchScorer().score(torch.zeros(1, 4, 7), torch.tensor([[[5.0, 0, 0, 4, 4]]]))


# ---- the wrapper and the adapter -----------------------------------------------------------
def test_dense_detector_postprocess_equals_torchvision(one_thread):
    torch.manual_seed(0)
    model = prepare(_lively(tiny_retinanet(in_channels=1)), torch.rand(4, 1, 64, 64))
    model.score_thresh = 0.05  # low enough that some anchors pass whatever the thread count
    x = torch.rand(3, 1, 64, 64)
    ours = model.detect(x)
    with torch.no_grad():
        theirs = model.torchvision_model().eval()(list(x))
    assert sum(len(d["boxes"]) for d in ours) > 0
    for a, b in zip(ours, theirs):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    # parameter names are torchvision's: a torchvision state dict loads as is
    assert set(model.state_dict()) == set(model.torchvision_model().state_dict())


def test_detector_cut_equals_removal_and_stages(one_thread):
    torch.manual_seed(0)
    model = prepare(_lively(tiny_retinanet(in_channels=1)), torch.rand(4, 1, 64, 64))
    adapter = registry.create("adapters", "detection")
    assert adapter.matches(model) and not adapter.matches(torch.nn.Linear(2, 2))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(stages_forward(adapter.stages(model), x), model(x), atol=0, rtol=0)
    graph = adapter.units(model, x)
    names = {layer.name for layer in graph.layers}
    assert {"backbone.fpn.layer_blocks.2.0", "backbone.fpn.inner_blocks.2.0", "head.classification_head.conv.3.0",
            "backbone.body.stem.0"} <= names and len(graph.layers) == 20
    assert "head.classification_head.cls_logits" in graph.skipped and "head.regression_head.bbox_reg" in graph.skipped
    fpn = graph.layer("backbone.fpn.layer_blocks.2.0")  # every pyramid level + the shared head's inputs
    assert {"backbone.fpn.layer_blocks.0.0", "head.classification_head.conv.0.0", "head.regression_head.conv.0.0"} <= set(fpn.modules)
    # boxes are in pixels (scale 64): float32 agreement to ~1e-5 of the output scale
    result = check_cut_equals_removal(model, x, "detection", per_layer=2, atol=1e-5 * 64)
    assert result["adapter"] == "detection" and result["diff64"] <= 1e-9 * 64 and result["effect"] > 1


# ---- the task and `cswap prune` ------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "scenes.npz"
    return write_npz(path, {"train": 128, "test": 48}, source="shapes", classes=(0, 1, 2), size=64, seed=0)


def test_task_manifold_covers_every_class_and_is_seeded(scenes):
    task = registry.create("tasks", "detection", {"root": str(scenes), "samples_per_class": 4, "batch_size": 4})
    s1, s2 = task.manifold(0), task.manifold(0)
    assert set(s1.class_counts) == {0, 1, 2} and all(n >= 4 for n in s1.class_counts.values())
    images, targets = s1.batches[0]
    assert images.shape[1:] == (1, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert targets.shape[-1] == 5 and (targets[..., 0] >= -1).all()
    torch.testing.assert_close(images, s2.batches[0][0])
    assert len(s1.rebatched(3)) == len(s1)  # padded to one width: batches concatenate
    seen = torch.cat([t for _, t in s1])
    for k in range(3):
        assert int((seen[..., 0] == k).any(dim=1).sum()) == s1.class_counts[k]
    with pytest.raises(Exception, match=r"class \d \((square|disk|triangle)\) appears in \d+ images.*samples_per_class=500"):
        registry.create("tasks", "detection", {"root": str(scenes), "samples_per_class": 500}).manifold(0)


def test_cswap_prune_detection_end_to_end(scenes, tmp_path, one_thread, capsys):
    from cswap.cli import main

    task = registry.create("tasks", "detection", {"root": str(scenes)})
    torch.manual_seed(0)
    model = tiny_retinanet(in_channels=1)
    train_detector(model, task.images("train", range(128)), task.targets("train", range(128), 3),
                   steps=120, lr=1e-2, batch_size=16)
    weights = tmp_path / "tiny_retinanet.pt"
    torch.save(model.state_dict(), weights)
    cfg = {
        "name": "tiny-det", "seed": 0, "threads": 1,
        "model": {"source": "cswap", "name": "tiny_retinanet", "kwargs": {"in_channels": 1}, "weights": str(weights)},
        "task": {"name": "detection", "options": {"root": str(scenes), "samples_per_class": 4}},
        "pruning": {"params_ratio": 0.2},
        "output": {"dir": str(tmp_path / "runs"), "latency_repeats": 2, "report_batch": 4},
    }
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["prune", str(path), "--out", str(out), "--quiet"]) == 0
    assert "mAP50" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"] == "detection" and report["metric"] == "mAP50"
    assert report["params_removed_ratio"] >= 0.2 and report["self_check_max_abs_diff"] < 1e-3
    assert report["before"]["mAP50"] > 0.02 and 0 <= report["after"]["mAP50"] <= 1
    assert report["categories"]["critical"] > 0 and sum(report["categories"].values()) == 416
    plan = json.loads((out / "plan.json").read_text())
    assert not any("cls_logits" in s["unit"] or "bbox_reg" in s["unit"] for s in plan["steps"])


@pytest.mark.slow
@pytest.mark.parametrize("name,skipped", [("retinanet_resnet50_fpn", 2), ("fcos_resnet50_fpn", 11)])
def test_torchvision_detectors_cut_equals_removal(name, skipped, one_thread):
    """The registered `torchvision_detector` builder on full-size torchvision detectors
    (random init, 3 classes, 64x64 input): FCOS's GroupNorm towers are skipped with the reason."""
    from cswap.models.detection import torchvision_detector

    torch.manual_seed(0)
    model = prepare(torchvision_detector(name, num_classes=3), torch.rand(2, 3, 64, 64))
    x = torch.rand(1, 3, 64, 64)
    graph = registry.create("adapters", "detection").units(model, x)
    assert len(graph.skipped) == skipped
    if name.startswith("fcos"):
        assert any("GroupNorm" in why for why in graph.skipped.values())
    result = check_cut_equals_removal(_lively(model), x, "detection", per_layer=1, max_layers=8, atol=1e-5 * 64)
    assert result["diff64"] <= 1e-9 * 64


# ---- COCO-format data ------------------------------------------------------------------------
def _write_coco(root, split, images, annotations, categories):
    """A COCO-format split written by hand: PNG files and annotations/instances_<split>.json."""
    from PIL import Image

    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries = []
    for i, pixels in enumerate(images):
        name = f"img{i}.png"
        Image.fromarray(pixels).save(root / split / name)
        entries.append({"id": 10 + i, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": categories}))


CATEGORIES = [{"id": 7, "name": "kite"}, {"id": 3, "name": "car"}]  # ids with a gap, not in order


@pytest.fixture()
def coco(tmp_path):
    """Two splits of 20x30 RGB images; category ids 3 and 7; one crowd box left out."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    train = [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
             {"id": 2, "image_id": 10, "category_id": 3, "bbox": [12.5, 0, 4, 20]},
             {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1},
             {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 5, 5], "iscrowd": 0}]
    _write_coco(tmp_path, "train", pixels, train, CATEGORIES)
    _write_coco(tmp_path, "val", pixels[:2], train[:2], CATEGORIES)
    return tmp_path, pixels


def _coco_task(root, **options):
    return registry.create("tasks", "detection", {"format": "coco", "root": str(root), "manifold_split": "train",
                                                  "eval_split": "val", "samples_per_class": 2, **options})


def test_coco_reader_gives_the_annotated_boxes_and_images(coco):
    root, pixels = coco
    task = _coco_task(root)
    assert task.class_names == ["car", "kite"] and task.class_count() == 2  # ascending category id
    images = task.images("train", [2, 0])
    torch.testing.assert_close(images, torch.from_numpy(np.stack([pixels[2], pixels[0]])).permute(0, 3, 1, 2) / 255.0,
                               atol=0, rtol=0)
    targets = task.targets("train", [0, 1, 2], 2)  # (label, x1, y1, x2, y2); the crowd box of image 1 is left out
    expected = torch.tensor([[[1, 1, 2, 11, 7], [0, 12.5, 0, 16.5, 20]],
                             [[-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]],
                             [[1, 5, 5, 10, 10], [-1, 0, 0, 0, 0]]])
    torch.testing.assert_close(targets, expected, atol=0, rtol=0)
    from cswap.errors import DataError

    with pytest.raises(DataError, match=r"class 0 \(car\) appears in 1 images"):  # the crowd box does not count
        task.manifold(0)
    ids = _coco_task(root, labels="category_id")
    assert ids.class_names == ["", "", "", "car", "", "", "", "kite"]
    assert ids.targets("train", [0], 2)[0, :, 0].tolist() == [7, 3]


def test_coco_reader_resizes_images_and_boxes_alike(coco):
    root, _ = coco
    task = _coco_task(root, image_size=(40, 15))  # (H, W): y doubled, x halved
    assert task.images("val", [0, 1]).shape == (2, 3, 40, 15)
    torch.testing.assert_close(task.targets("val", [0], 2)[0, 0], torch.tensor([1, 0.5, 4, 5.5, 14]))


def test_coco_reader_refuses_malformed_annotations_in_one_line(coco, tmp_path):
    from cswap.errors import ConfigError, DataError

    root, pixels = coco
    bad = {"outside": ({"bbox": [25, 0, 10, 5]}, r"annotations\[0\]: bbox \[25, 0, 10, 5\] is empty or outside"),
           "category": ({"category_id": 5}, r"annotations\[0\] names category_id 5, which is not in categories"),
           "image": ({"image_id": 99}, r"annotations\[0\] names image_id 99"),
           "nan": ({"bbox": [1, 1, float("nan"), 2]}, "bbox must be 4 finite numbers")}
    for name, (change, message) in bad.items():
        folder = tmp_path / name
        ann = {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 1, 2, 2], **change}
        _write_coco(folder, "train", pixels[:1], [ann], CATEGORIES)
        with pytest.raises(DataError, match=message) as info:
            _coco_task(folder).targets("train", [0], 1)
        assert "\n" not in str(info.value) and "instances_train.json" in str(info.value)
    (root / "train" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"img1\.png of image id 11 cannot be read"):
        _coco_task(root).images("train", [1])
    _write_coco(tmp_path / "sizes", "train", [pixels[0], pixels[0][:10]], [], CATEGORIES)
    with pytest.raises(DataError, match="images of 2 sizes.*image_size"):
        _coco_task(tmp_path / "sizes").images("train", [0])
    with pytest.raises(DataError, match="no COCO annotations for split 'val'"):
        _coco_task(tmp_path / "sizes").images("val", [0])
    with pytest.raises(ConfigError, match="options of format coco"):
        registry.create("tasks", "detection", {"root": str(root), "image_size": [8, 8]})
