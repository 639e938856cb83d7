"""A pruned model leaves C-SWAP: `cswap export` (ONNX checked with onnxruntime, torch.export
reloaded) and the API's `save_pruned`/`load_pruned` pair, on one tiny `cswap prune` run."""
from __future__ import annotations

import pytest
import torch
import yaml

from cswap.cli import main
from cswap.errors import DataError, ModelError
from cswap.export import load_pruned, save_pruned
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.plan import PruningPlan
from cswap.run import load_pruned as load_run

from conftest import patterns

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


def test_export_onnx_runs_in_onnxruntime_like_the_pruned_model(run, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert f"written: {run / 'pruned_model.onnx'}" in out and "onnxruntime: max |difference|" in out
    session = ort.InferenceSession(str(run / "pruned_model.onnx"), providers=["CPUExecutionProvider"])
    x = _input()[:1]  # the plan's input shape (traced on zeros; checked here on another input)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        _close(got, load_run(run)(x))


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
    assert len(err.splitlines()) == 1 and "no config.yaml" in err and "model=" in err


def test_save_pruned_load_pruned_round_trip(run, tmp_path):
    plan = PruningPlan.load(run / "plan.json")
    model = _model(run.parent / "model.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = save_pruned(tmp_path / "api", model, plan, params_ratio=0.3)
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
        save_pruned(tmp_path / "from_run", model, plan, params_ratio=0.3, pruned=from_run)
        torch.testing.assert_close(load_pruned(tmp_path / "from_run", model=_model())(x), from_run(x), atol=0, rtol=0)
    # weights changed after pruning (fine-tuning, say) are the ones saved
    with torch.no_grad():
        next(pruned.parameters()).add_(1.0)
    save_pruned(tmp_path / "tuned", model, plan, params_ratio=0.3, pruned=pruned)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "tuned", model=_model())(x), pruned(x), atol=0, rtol=0)


def test_save_pruned_refuses_a_model_of_other_widths(run, tmp_path):
    plan = PruningPlan.load(run / "plan.json")
    model = _model(run.parent / "model.pt")
    with pytest.raises(ModelError, match="not the plan's replay"):
        save_pruned(tmp_path / "bad", model, plan, params_ratio=0.3, pruned=_model())
    with pytest.raises(DataError, match="pruned_model.pt is missing"):
        plan.save(tmp_path / "half" / "plan.json")
        load_pruned(tmp_path / "half", model=_model())
