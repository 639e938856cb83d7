"""A pruned model leaves C-SWAP: `cswap export` (ONNX with dynamic batch and spatial axes,
run in onnxruntime at other shapes than the analysed one, its metadata; torch.export reloaded)
and the API's `save_pruned`/`load_pruned` pair, on one tiny `cswap prune` run."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from cswap.cli import main
from cswap.errors import DataError, ModelError
from cswap.export import load_pruned, save_pruned
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan

from conftest import patterns

load_run = load_pruned  # a run directory and a save_pruned folder load through the same door

ARCH = {"width": 4, "in_channels": 1, "num_classes": 3}


def _model(weights=None):
    model = cifar_resnet8(**ARCH)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One complete run directory of the tiny ResNet-8 on the npz fixture (as conftest's `config`)."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("export")
    x, y = patterns(30, size=12, seed=3)
    imgs = (x.clamp(-1, 2).add(1).div(3).mul(255)).to(torch.uint8).squeeze(1).numpy()
    perm = np.random.default_rng(0).permutation(len(y))
    np.savez_compressed(tmp / "tiny.npz", manifold_images=imgs[perm[:60]], manifold_labels=y.numpy()[perm[:60]],
                        eval_images=imgs[perm[60:]], eval_labels=y.numpy()[perm[60:]])
    torch.manual_seed(0)
    torch.save(cifar_resnet8(**ARCH).state_dict(), tmp / "model.pt")
    cfg = {"name": "tiny", "seed": 1,
           "model": {"source": "cswap", "name": "cifar_resnet8", "kwargs": ARCH, "weights": "model.pt"},
           "task": {"name": "classification", "options": {"dataset": "npz", "root": "tiny.npz",
                    "manifold_split": "manifold", "eval_split": "eval", "samples_per_class": 12}},
           "pruning": {"params_ratio": 0.3}, "output": {"dir": "runs", "latency_repeats": 2}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["prune", str(tmp / "tiny.yaml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def _input(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 round-off relative to the output's scale: a different graph runtime reorders sums."""
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=0)


def _onnxruntime(path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_export_onnx_takes_other_shapes_like_the_pruned_model(run, capsys):
    """Analysed at 1x1x12x12; the file runs at batch 2 and 5 and at 24x20 and 8x36 pixels
    (a CNN with global pooling takes any size) with PyTorch's outputs."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert f"written: {run / 'pruned_model.onnx'}" in out and "takes any batch, height, width" in out
    assert "onnxruntime == PyTorch at 2x1x24x12, 3x1x12x24" in out
    from cswap.onnx_export import read_metadata

    full = PruningPlan.load(run / "plan.json").layers  # the plan's own widths: the run set no round_to
    odd = {n: w for n, w in json.loads(read_metadata(run / "pruned_model.onnx")["cswap.widths"]).items()
           if w < full[n] and w % 4}
    assert odd and f"WARNING: {len(odd)} pruned layers are not a multiple of 4 wide" in out
    assert "replay with pruning.round_to: 4" in out
    pruned = load_pruned(run)
    for shape in ((2, 1, 24, 20), (5, 1, 8, 36)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            _close(_onnxruntime(run / "pruned_model.onnx", x), pruned(x))


def test_export_onnx_records_the_plan_the_target_and_the_widths(run):
    pytest.importorskip("onnxscript")
    from cswap.onnx_export import read_metadata

    path = run / "pruned_model.onnx"
    if not path.exists():
        assert main(["export", str(run)]) == 0
    meta = read_metadata(path)
    plan, report = json.loads(meta["cswap.plan"]), json.loads((run / "report.json").read_text())
    assert plan["method"] == "cswap" and plan["steps_applied"] == report["steps_applied"] > 0
    assert plan["steps"] == len(PruningPlan.load(run / "plan.json").steps)
    assert json.loads(meta["cswap.target"])["params_ratio"] == 0.3
    widths, pruned = json.loads(meta["cswap.widths"]), load_pruned(run)
    assert widths and all(pruned.get_submodule(name).out_channels == w for name, w in widths.items())
    assert any(w < pruned_from_plan for w, pruned_from_plan in
               zip(widths.values(), PruningPlan.load(run / "plan.json").layers.values()))
    assert json.loads(meta["cswap.traced_input_shape"]) == [1, 1, 12, 12]


def test_export_onnx_opset_and_input_shape_and_static(run, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path / "fixed.onnx"
    assert main(["export", str(run), "--out", str(path), "--opset", "18", "--input-shape", "1,16,20", "--static"]) == 0
    assert "takes a fixed input shape" in capsys.readouterr().out
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 16, 20]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    x = torch.randn(1, 1, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(_onnxruntime(path, x), load_pruned(run)(x))
    for bad, message in (("2,16,20", "has 2 channels; the model takes 1"), ("1,0,20", "positive"),
                         ("1,x,20", "--input-shape must be a comma-separated list")):
        assert main(["export", str(run), "--out", str(path), "--input-shape", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


class _FixedSize(nn.Module):
    """Spatial size fixed by a linear layer over the flattened map; any batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class _SizeAsConstant(nn.Module):
    """Reads its width as a Python number: PyTorch takes any size, a traced graph keeps one."""

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * float(x.shape[-1])


def test_a_model_that_fixes_its_size_is_exported_with_the_axes_it_allows(tmp_path):
    """PyTorch itself refuses other spatial sizes: the file takes any batch, a fixed size."""
    pytest.importorskip("onnxscript")
    from cswap.onnx_export import write_onnx

    torch.manual_seed(0)
    model = _FixedSize().eval()
    fixed = write_onnx(model, torch.zeros(1, 1, 6, 6), tmp_path / "fixed.onnx")
    assert fixed.dynamic_axes == {0: "batch"} and "height, width fixed: PyTorch refuses input" in fixed.note
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(_onnxruntime(fixed.path, x), model(x))


def test_a_size_the_traced_graph_fixes_is_found_in_onnxruntime(tmp_path):
    """PyTorch takes any width here, the exported graph does not: the check at other shapes
    finds it and the file keeps only the axes onnxruntime runs correctly."""
    pytest.importorskip("onnxscript")
    from cswap.onnx_export import write_onnx

    constant = write_onnx(_SizeAsConstant(), torch.zeros(1, 1, 4, 4), tmp_path / "constant.onnx")
    assert 2 not in constant.dynamic_axes and 3 not in constant.dynamic_axes
    assert "fixed:" in constant.note and len(constant.checked_shapes) == (2 if constant.dynamic_axes else 0)


def test_export_torch_export_reloads_like_the_pruned_model(run, tmp_path, capsys):
    path = tmp_path / "m.pt2"
    assert main(["export", str(run), "--format", "torch_export", "--out", str(path)]) == 0
    assert f"written: {path}" in capsys.readouterr().out
    x = _input(1)[:1]
    with torch.no_grad():
        pruned = load_run(run)
        got = torch.export.load(str(path)).module()(x)
        _close(got, pruned(x))
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in _model().parameters())


def test_export_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no pruned model: plan.json is missing" in err


def test_export_of_a_save_pruned_folder(run, tmp_path, capsys):
    """A folder written by `save_pruned` exports when it records the model's build recipe,
    and without one the refusal says how to save it."""
    pytest.importorskip("onnxscript")
    plan = PruningPlan.load(run / "plan.json")
    model = _model(run.parent / "model.pt")
    save_pruned(tmp_path / "bare", model, plan, params_ratio=0.3, recovery="none")
    assert main(["export", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records no architecture" in err and "builder" in err
    recipe = {"source": "cswap", "name": "cifar_resnet8", "kwargs": ARCH}
    pruned = save_pruned(tmp_path / "api", model, plan, params_ratio=0.3, recovery="none", builder=recipe)
    assert main(["export", str(tmp_path / "api")]) == 0
    assert "takes any batch, height, width" in capsys.readouterr().out
    x = torch.randn(3, 1, 20, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _close(_onnxruntime(tmp_path / "api" / "pruned_model.onnx", x), pruned(x))


def test_save_pruned_load_pruned_round_trip(run, tmp_path):
    plan = PruningPlan.load(run / "plan.json")
    model = _model(run.parent / "model.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = save_pruned(tmp_path / "api", model, plan, params_ratio=0.3, recovery="none")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the given model is not changed
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == ["plan.json", "pruned.json", "pruned_model.pt"]
    # reloaded onto a fresh instance at random initialisation: the saved weights, the saved widths
    reloaded = load_pruned(tmp_path / "api", model=_model())
    x = _input(2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), pruned(x), atol=0, rtol=0)
        # the CLI's run directory at the same target holds a model of the same widths (repaired by
        # the default recovery): save_pruned takes it as `pruned` and it reloads bit for bit
        from_run = load_pruned(run)
        save_pruned(tmp_path / "from_run", model, plan, params_ratio=0.3, recovery="none", pruned=from_run)
        torch.testing.assert_close(load_pruned(tmp_path / "from_run", model=_model())(x), from_run(x), atol=0, rtol=0)
    # weights changed after pruning (fine-tuning, say) are the ones saved
    with torch.no_grad():
        next(pruned.parameters()).add_(1.0)
    save_pruned(tmp_path / "tuned", model, plan, params_ratio=0.3, recovery="none", pruned=pruned)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "tuned", model=_model())(x), pruned(x), atol=0, rtol=0)


def test_save_pruned_refuses_a_model_of_other_widths(run, tmp_path):
    plan = PruningPlan.load(run / "plan.json")
    model = _model(run.parent / "model.pt")
    other = cifar_resnet8(**{**ARCH, "width": 3})  # widths no prefix of the plan gives
    with pytest.raises(ModelError, match="is no replay of this plan"):
        save_pruned(tmp_path / "bad", model, plan, params_ratio=0.3, recovery="none", pruned=other)
    with pytest.raises(DataError, match="pruned_model.pt is missing"):
        plan.save(tmp_path / "half" / "plan.json")
        load_pruned(tmp_path / "half", model=_model())
