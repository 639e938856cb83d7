"""The classification task's data: bad inputs refused with the first offending index (issue
25), and ImageFolder images transformed as timm evaluates the model when it carries timm's data
config, with a warning when nothing normalises them (issue 28)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cswap.errors import DataError
from cswap.tasks.classification import ClassificationTask


def _tensors(n: int = 12, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % classes


def _linear(outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, outputs)).eval()


def test_tensor_inputs_that_are_not_finite_are_refused_with_their_index():
    x, y = _tensors()
    x[7, 0, 2, 1] = float("nan")
    with pytest.raises(DataError, match=r"split 'train': input 7 holds NaN or infinite values"):
        ClassificationTask.from_tensors(x, y, 2).manifold(0)
    x[7, 0, 2, 1], x[9, 0, 0, 0] = 0.0, float("-inf")
    with pytest.raises(DataError, match="input 9 holds NaN"):
        ClassificationTask.from_tensors(x, y, 2).manifold(0)


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 1, 2, 0, 1, 2.5, 0, 1, 2, 0, 1, 2]), r"label 2\.5 at index 5 is not an integer"),
    (torch.tensor([0, 1, 2, 0, -1, 2, 0, 1, 2, 0, 1, 2]), "label -1 at index 4 is negative"),
    (torch.arange(11) % 3, r"12 inputs but labels of shape \(11,\)"),
    (torch.zeros(12, 2, dtype=torch.long), r"12 inputs but labels of shape \(12, 2\)"),
])
def test_labels_that_are_not_one_integer_per_input_are_refused(labels, message):
    x, _ = _tensors()
    with pytest.raises(DataError, match=message):
        ClassificationTask.from_tensors(x, labels, 2).manifold(0)


def test_integral_float_labels_are_accepted():
    x, y = _tensors()
    s = ClassificationTask.from_tensors(x, y.float(), 2).manifold(0)
    assert s.class_counts == {0: 2, 1: 2, 2: 2}


def test_labels_outside_the_models_outputs_are_refused_naming_the_first():
    x, y = _tensors(classes=4)  # labels 0..3
    task = ClassificationTask.from_tensors(x, y, 2)
    task.bind_model(_linear(3))
    with pytest.raises(DataError, match=r"label 3 at index 3 is outside the model's 3 outputs \(labels 0\.\.2\)"):
        task.manifold(0)
    fitting = ClassificationTask.from_tensors(x, y, 2)
    fitting.bind_model(_linear(4))
    assert set(fitting.manifold(0).class_counts) == {0, 1, 2, 3}


def test_a_held_out_split_is_checked_too():
    x, y = _tensors()
    test_x, test_y = _tensors(6)
    test_x[4] = float("inf")
    task = ClassificationTask.from_tensors(x, y, 2, test=(test_x, test_y))
    with pytest.raises(DataError, match="split 'test': input 4"):
        task.evaluate(_linear(3))


def test_npz_arrays_are_checked(tmp_path):
    images = np.random.default_rng(0).random((12, 4, 4)).astype(np.float32)
    labels = np.arange(12) % 3
    np.savez(tmp_path / "ok.npz", s_images=images, s_labels=labels)
    task = ClassificationTask(ClassificationTask.Options(dataset="npz", root=tmp_path / "ok.npz", samples_per_class=2,
                                                         manifold_split="s", eval_split="s"))
    assert len(task.manifold(0)) == 6
    images[10, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", s_images=images, s_labels=labels[:11])
    task = ClassificationTask(ClassificationTask.Options(dataset="npz", root=tmp_path / "nan.npz", samples_per_class=2,
                                                         manifold_split="s", eval_split="s"))
    with pytest.raises(DataError, match="input 10 holds NaN"):
        task.manifold(0)
    np.savez(tmp_path / "count.npz", s_images=np.zeros((12, 4, 4), np.uint8), s_labels=labels[:11])
    task = ClassificationTask(ClassificationTask.Options(dataset="npz", root=tmp_path / "count.npz",
                                                         samples_per_class=2, manifold_split="s", eval_split="s"))
    with pytest.raises(DataError, match=r"split 's': 12 inputs but labels of shape \(11,\)"):
        task.manifold(0)


# ---- ImageFolder and timm's data config --------------------------------------------------
@pytest.fixture()
def imagefolder(tmp_path):
    """root/val/<class>/*.png: RGB images of 40x52 pixels, two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(2):
        folder = tmp_path / "val" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path


def _folder_task(root, **options) -> ClassificationTask:
    return ClassificationTask(ClassificationTask.Options(dataset="imagefolder", root=root, samples_per_class=2,
                                                         manifold_split="val", eval_split="val", **options))


def test_imagefolder_takes_timms_data_config_from_the_model(imagefolder):
    timm = pytest.importorskip("timm")
    from PIL import Image

    model = timm.create_model("resnet18", pretrained=False, num_classes=2,
                              pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 0.8,
                                                      "interpolation": "bicubic"}).eval()
    task = _folder_task(imagefolder)
    task.bind_model(model)
    got = task.manifold(0).batches[0][0]
    # timm's own evaluation transform of the same files, in the same order (sorted, per class)
    expected_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)
    files = sorted((imagefolder / "val").glob("*/*.png"))
    expected = torch.stack([expected_transform(Image.open(f).convert("RGB")) for f in files])
    assert got.shape == (4, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_imagefolder_options_win_over_timms_data_config(imagefolder):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    task = _folder_task(imagefolder, image_size=24, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    task.bind_model(model)
    x = task.manifold(0).batches[0][0]
    assert x.shape == (4, 3, 24, 24) and 0 <= float(x.min()) and float(x.max()) <= 1  # the given identity statistics


def test_imagefolder_without_normalisation_warns(imagefolder):
    task = _folder_task(imagefolder, image_size=16)
    with pytest.warns(UserWarning, match="not normalised.*give mean and std"):  # also logged (cswap logger)
        task.bind_model(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)))
        x = task.manifold(0).batches[0][0]
    assert 0 <= float(x.min()) and float(x.max()) <= 1
