"""The rows of docs/errors.md that other test files do not already cover."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cswap import registry
from cswap.cli import main
from cswap.errors import ConfigError, DataError, ResourceError
from cswap.interfaces import Scores, ScoringFunction
from cswap.models.cifar_resnet import cifar_resnet8
from cswap.tasks.classification import ClassificationTask

from conftest import cswap_plan, patterns
from roundoff import RELATIVE, RecordingTest, assert_no_knife_edge, float32_roundoff


def test_empty_sample_set(tmp_path, config, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, manifold_images=np.zeros((0, 12, 12), np.uint8), manifold_labels=np.zeros(0, np.int64),
             eval_images=np.zeros((3, 12, 12), np.uint8), eval_labels=np.arange(3))
    assert main(["prune", str(config), "--set", f"task.options.root={empty}", "--out", str(tmp_path / "r")]) == 2
    assert "split 'manifold' is empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_target_beyond_what_can_be_removed_is_best_effort(tmp_path, config, capsys):
    out = tmp_path / "r"
    with pytest.warns(UserWarning, match="beyond what this plan can remove"):
        assert main(["prune", str(config), "--set", "pruning.params_ratio=0.99", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.3 < report["params_removed_ratio"] < 0.99
    assert "beyond what this plan can remove" in (out / "log.txt").read_text()


class SmallMemoryScorer(ScoringFunction):
    """True-class probability on a 'device' that fits at most 8 samples per batch."""

    def __init__(self):
        self.inner = registry.create("scorers", "class_probability")
        self.sizes = []

    def score(self, outputs, targets) -> Scores:
        self.sizes.append(len(targets))
        if len(targets) > 8:
            raise torch.OutOfMemoryError("simulated: batch too large for the device")
        return self.inner.score(outputs, targets)


def _model():
    torch.manual_seed(1)  # seed 0 has a unit whose significant xi is within round-off of 0
    return cifar_resnet8(width=4, in_channels=1, num_classes=3).eval()


def _analysis(scorer, batch_size, test=None):
    x, y = patterns(12, size=12)
    task = ClassificationTask.from_tensors(x, y, 12, batch_size=batch_size)
    return cswap_plan(_model(), task, 0, scorer=scorer, test=test)


def test_out_of_memory_halves_the_batch_then_fails_clearly():
    scorer = SmallMemoryScorer()
    with pytest.warns(UserWarning, match="out of memory with batches of 36 samples; retrying with 18"):
        plan = _analysis(scorer, batch_size=36, test=registry.create("tests", "paired_t", RELATIVE))  # 36 -> 18 -> 9 -> 5
    assert max(scorer.sizes[-10:]) <= 8 and plan.steps
    recorded = RecordingTest(registry.create("tests", "paired_t", RELATIVE))
    reference = _analysis(registry.create("scorers", "class_probability"), batch_size=9, test=recorded)
    # batches of 5 and of 9 round differently: the same decisions where none is on a knife edge
    assert_no_knife_edge(recorded, roundoff=float32_roundoff(_model(), patterns(12, size=12)[0]))
    assert [(s.unit, s.category) for s in plan.steps] == [(s.unit, s.category) for s in reference.steps]

    class NoMemory(SmallMemoryScorer):
        def score(self, outputs, targets):
            raise torch.OutOfMemoryError("simulated")

    with pytest.raises(ResourceError, match="one sample per batch"):
        with pytest.warns(UserWarning):
            _analysis(NoMemory(), batch_size=2)


# ---- every bad input: status 2, one line, no traceback, nothing created (issue #14, item 4) -
def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


def _one_line(capsys, *needles: str) -> str:
    """The error is one line; console warnings before it (e.g. random weights) are their own lines."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_malformed_yaml_is_one_line_naming_the_position(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {source: cswap\n  name: [\n")
    before = _files(tmp_path)
    assert main(["prune", str(bad), "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, str(bad), "not valid YAML", "line 3")
    assert _files(tmp_path) == before
    assert main(["prune", str(bad), "--set", "seed=[1", "--dry-run"]) == 2  # an override's value too
    _one_line(capsys)


def test_out_that_is_a_file_under_a_file_or_unwritable(tmp_path, config, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    if os.geteuid() == 0:  # root writes anywhere a mode allows; sysfs refuses even root
        unwritable = Path("/sys/cswap-test/run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        unwritable = locked / "run"
    before = _files(tmp_path)
    for out, needle in ((afile, "exists and is a file"), (afile / "sub", f"{afile} is a file, not a folder"),
                        (unwritable, "cannot create run directory")):
        assert main(["prune", str(config), "--out", str(out), "--quiet"]) == 2
        _one_line(capsys, needle)
    assert _files(tmp_path) == before and not unwritable.exists()


def test_full_disk_is_one_line_and_leaves_a_resumable_run(tmp_path, config):
    """A file-size limit makes the writes of pruned_model.pt (31 kB) fail the way a full disk
    does (EFBIG instead of ENOSPC, through the same torch writer), after the plan (14 kB)."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    run = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "cswap", "prune", str(config), "--out", str(run), "--quiet"],
                          cwd=Path(__file__).resolve().parents[1], preexec_fn=limit, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: cannot write {run}.partial/pruned_model.pt: ")
    partial = tmp_path / "r.partial"
    assert not run.exists() and (partial / "plan.json").exists() and not list(partial.glob(".*.tmp"))
    assert main(["prune", str(config), "--resume", str(partial), "--quiet"]) == 0
    assert (run / "pruned_model.pt").exists()


def test_empty_imagefolder_is_refused(tmp_path, config, capsys):
    root = tmp_path / "images"
    (root / "manifold").mkdir(parents=True)
    (root / "eval").mkdir()
    args = ["prune", str(config), "--out", str(tmp_path / "r"), "--quiet", "--set", "task.options.dataset=imagefolder",
            "--set", f"task.options.root={root}", "--set", "task.options.input_shape=[1, 12, 12]"]
    before = _files(tmp_path)
    assert main(args) == 2
    _one_line(capsys, f"{root / 'manifold'} holds no images")
    (root / "manifold" / "cat").mkdir()  # a class folder without images
    assert main(args) == 2
    _one_line(capsys, "holds no images", "no valid file")
    assert _files(tmp_path) - before == {root / "manifold" / "cat"}


def test_truncated_state_and_failed_rename_on_resume(tmp_path, config, capsys):
    from cswap.config import dump_config, load_config

    partial = tmp_path / "r.partial"
    partial.mkdir()
    (partial / "config.yaml").write_text(dump_config(load_config(config)))
    (partial / "analysis_state.json").write_text('{"decisions": [{"unit": "conv1:0", "categ')
    before = _files(tmp_path)
    assert main(["prune", str(config), "--resume", str(partial), "--quiet"]) == 2
    _one_line(capsys, f"{partial / 'analysis_state.json'} is not valid JSON", "--force")
    (partial / "analysis_state.json").write_text('{"decisions": [{"unit": "conv1:0"}]}')
    assert main(["prune", str(config), "--resume", str(partial), "--quiet"]) == 2
    _one_line(capsys, "does not hold a list of decisions")
    assert _files(tmp_path) == before

    # a complete run whose rename fails: the target was filled in the meantime
    run = tmp_path / "done"
    assert main(["prune", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    os.replace(run, tmp_path / "done.partial")
    run.mkdir()
    (run / "someone_else.txt").write_text("x")
    assert main(["prune", str(config), "--resume", str(run), "--quiet"]) == 2
    _one_line(capsys, f"cannot rename {run}.partial to {run}: it is not empty")
    assert (tmp_path / "done.partial" / "report.json").exists()


def test_bad_checkpoint_and_bad_options_are_refused_before_anything_exists(tmp_path, config, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    before = _files(tmp_path)
    for override, needle in ((f"model.weights={garbage}", "is not a PyTorch checkpoint"),
                             ("test={name: paired_t, options: {alpha: 0}}", "alpha: Input should be greater than 0"),
                             ("task.options.samples_per_class=0", "samples_per_class: Input should be greater")):
        assert main(["prune", str(config), "--set", override, "--out", str(tmp_path / "r"), "--quiet"]) == 2
        _one_line(capsys, needle)
    assert _files(tmp_path) == before  # no r.partial, no runs/, no lock


def test_debug_shows_the_traceback(tmp_path, config):
    with pytest.raises(ConfigError):
        main(["prune", str(config), "--set", "task.options.samples_per_class=0", "--debug", "--dry-run"])


def test_truncated_or_edited_plan_is_a_clear_error(tmp_path, config):
    import cswap

    run = tmp_path / "r"
    assert main(["prune", str(config), "--out", str(run), "--quiet"]) == 0
    plan = (run / "plan.json").read_text()
    (run / "plan.json").write_text(plan[: len(plan) // 2])
    with pytest.raises(DataError, match=r"plan.json is not valid JSON"):
        cswap.load_pruned(run)
    (run / "plan.json").write_text(plan.replace('layer3.0.conv1', 'layer9.0.conv1'))  # consistent, wrong model
    with pytest.raises(DataError, match=r"layer 'layer9.0.conv1' of the plan is not a module of CifarResNet"):
        cswap.load_pruned(run)
    (run / "plan.json").write_text(plan.replace('"params_total": ', '"params_total": 1'))
    with pytest.raises(DataError, match="was made for a model with"):
        cswap.load_pruned(run)


# ---- a sample set that cannot answer for every class (issue #14, item 5) -------------------
def test_sample_set_with_one_class_of_a_ten_class_model_is_refused(tmp_path, capsys):
    from cswap.demo import DEMO_CONFIG, demo_config

    data = np.load(demo_config().task.options["root"])
    keep = data["manifold_labels"] == 0
    one = tmp_path / "class0.npz"
    np.savez(one, manifold_images=data["manifold_images"][keep], manifold_labels=data["manifold_labels"][keep],
             eval_images=data["eval_images"], eval_labels=data["eval_labels"])
    before = _files(tmp_path)
    assert main(["prune", str(DEMO_CONFIG), "--set", f"task.options.root={one}",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    _one_line(capsys, "S covers 1 of the 10 classes the model predicts", "present: [0]", "missing: [1, 2")
    assert _files(tmp_path) == before


def test_imagefolder_with_one_class_and_the_python_api_are_refused(tmp_path, config, capsys):
    from PIL import Image

    import cswap

    root = tmp_path / "images"
    for split in ("manifold", "eval"):
        (root / split / "only").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((12, 12), i * 20, np.uint8)).save(root / split / "only" / f"{i}.png")
    assert main(["prune", str(config), "--out", str(tmp_path / "r"), "--quiet", "--set",
                 "task.options.dataset=imagefolder", "--set", f"task.options.root={root}", "--set", "model.weights=null",
                 "--set", "model.kwargs={width: 4, in_channels: 3, num_classes: 3}"]) == 2  # ImageFolder gives RGB
    _one_line(capsys, "S covers 1 of the 3 classes")  # the model's output width: 3
    model = cifar_resnet8(width=4, in_channels=1, num_classes=3).eval()
    x, y = patterns(12, size=12)
    with pytest.raises(DataError, match=r"covers 2 of the 3 classes .*missing: \[2\]"):
        cswap.analyze(model, (x[y < 2], y[y < 2]), samples_per_class=12, progress=False)


def test_a_task_that_declares_no_classes_is_not_checked():
    from cswap.interfaces import Manifold, Task

    class Groups(Task):  # a third-party task whose groups are not classes
        def __init__(self):
            x, y = patterns(12, size=12)
            self.x, self.y = x, y * 0  # one group only

        def manifold(self, seed, samples_per_class=None):
            return Manifold([(self.x, self.y)], {0: len(self.y)})

        def evaluate(self, model, device="cpu"):
            return {"accuracy": 0.0}

        def example_inputs(self):
            return self.x[:1]

    import cswap

    model = cifar_resnet8(width=4, in_channels=1, num_classes=3).eval()
    assert Groups().num_classes is None
    assert cswap.analyze(model, Groups(), progress=False).steps


# ---- issue 25: every parse of user text and every hand-edited file is one line ------------
@pytest.mark.parametrize("override,needle", [
    ("device=foo", "device: Value error, 'foo' is not a device: cpu, cuda, cuda:N or mps"),
    ("seed=-5", "seed: Input should be greater than or equal to 0"),
    (f"seed={2**32}", "seed: Input should be less than or equal to 4294967295"),
    ("seed=true", "seed: Input should be a valid integer"),
    ("name=../../elsewhere", "is not a plain file name"),
])
def test_bad_run_settings_are_one_line(tmp_path, config, capsys, override, needle):
    before = _files(tmp_path)
    assert main(["prune", str(config), "--set", override, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    _one_line(capsys, needle)
    assert _files(tmp_path) == before


def test_a_device_this_machine_lacks_is_refused_before_anything_runs(tmp_path, config, capsys):
    """`config.check_device_available`: `cswap curve` calls it before any analysis (the
    config itself still validates and dry-runs, so a GPU config can be checked on a laptop)."""
    from cswap.config import check_device_available, load_config

    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert load_config(config, [f"device={device}"]).device == device
    with pytest.raises(ConfigError, match=f"device {device!r} is not available here"):
        check_device_available(device)
    check_device_available("cpu")
    assert main(["curve", str(config), "--set", f"device={device}", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    _one_line(capsys, f"device {device!r} is not available here", "--set device=cpu")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args,needle", [
    (["curve", "--criterion-options", "not json"], "--criterion-options is not valid JSON"),
    (["curve", "--criterion-options", "[1]"], "--criterion-options must be a JSON object mapping each name"),
    (["curve", "--criterion-options", '{"amp": 3}'], "must be a JSON object mapping each name"),
    (["curve", "--criterion-options", '{"ampp": {"tau": 1}}'], "criterion options given for 'ampp', which is not"),
    (["curve", "--criteria", "amp", "--criterion-options", '{"amp": {"nonsense": 1}}'],
     "'amp': nonsense: Extra inputs are not permitted"),
    (["curve", "--seeds", "0"], "--seeds 0: give at least 1"),
    (["curve", "--ratios", "nan"], "ratios must lie in [0, 1)"),
    (["sweep", "--test-option", "voting=[unclosed"], "--test-option voting: '[unclosed' is not a valid YAML value"),
    (["sweep", "--alpha", "0.05,x"], "--alpha must be a comma-separated list"),
])
def test_command_line_text_is_parsed_in_one_line(tmp_path, config, capsys, args, needle):
    before = _files(tmp_path)
    assert main([args[0], str(config), *args[1:], "--out", str(tmp_path / "out"), "--quiet"]) == 2
    _one_line(capsys, needle)
    assert _files(tmp_path) == before


def test_a_state_file_that_is_not_a_list_of_decisions_is_one_line(tmp_path, config, capsys):
    from cswap.config import dump_config, load_config
    from cswap.rundir import MARKER, MARKER_FORMAT

    partial = tmp_path / "r.partial"
    partial.mkdir()
    (partial / MARKER).write_text(MARKER_FORMAT + "\n")
    (partial / "config.yaml").write_text(dump_config(load_config(config)))
    before = _files(tmp_path)
    for state in ('{"decisions": 5}', '{"decisions": [{"unit": "conv1", "category": "neutral"}]}', '[1, 2]',
                  '{"decisions": [{"unit": "conv1:0", "category": "neutral", "xi": "big", "p_values": {}}]}'):
        (partial / "analysis_state.json").write_text(state)
        assert main(["prune", str(config), "--resume", str(partial), "--quiet"]) == 2
        _one_line(capsys, "does not hold a list of decisions")
        assert main(["prune", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 2  # a fresh run keeps it
        _one_line(capsys, "holds an unreadable analysis_state.json" if "5" in state or "[1" in state
                  else "recorded decisions", "--force")
    assert _files(tmp_path) == before | {partial / "analysis_state.json"}  # nothing else created or removed


def test_hand_edited_plan_values_are_named(tmp_path, config):
    """`cswap.plan_check.check_plan_data` (what `PruningPlan.from_json` runs first) on a real
    plan.json with one value edited at a time."""
    from cswap.plan_check import check_plan_data

    run = tmp_path / "r"
    assert main(["prune", str(config), "--out", str(run), "--quiet"]) == 0
    plan = json.loads((run / "plan.json").read_text())
    check_plan_data(plan, "plan.json")  # the file as written passes
    layer = next(iter(plan["layers"]))
    edits = [(("layers", layer), "abc", rf"layers = .* is not a mapping of layer names to positive widths"),
             (("input_shape",), [1, -12, 12], r"input_shape = \[1, -12, 12\] is not a list of positive sizes"),
             (("params_total",), "many", "params_total = 'many' is not a positive count"),
             (("steps", 0, "unit"), f"{layer}:999999", r"steps\[0\]: unit .* is not a channel of a layer"),
             (("steps", 0, "xi"), "high", r"steps\[0\]: xi = 'high' is not a number"),
             (("steps", 1, "unit"), plan["steps"][0]["unit"], r"steps\[1\] removes .* a second time"),
             (("steps",), None, "steps = None is not a list of steps")]
    for keys, value, pattern in edits:
        edited = json.loads(json.dumps(plan))
        node = edited
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        with pytest.raises(DataError, match=pattern):
            check_plan_data(edited, "plan.json")
    with pytest.raises(DataError, match="field 'steps' is missing"):
        check_plan_data({k: v for k, v in plan.items() if k != "steps"}, "plan.json")


def test_labels_the_model_cannot_predict_and_non_finite_inputs_are_named():
    """`cswap.coverage`, the core's check of S for any task (the classification task refuses
    such labels itself, earlier): labels 0..4 for a 3-output model were reported as "covers 5
    of the 5 classes"; now they are named."""
    from cswap.coverage import check_coverage, check_finite_inputs
    from cswap.interfaces import Manifold, Task

    class FiveClasses(Task):  # a third-party task: five classes, S of the given batches
        num_classes, missing_classes = 5, "error"

        def __init__(self, batches):
            self.batches = batches

        def manifold(self, seed, samples_per_class=None):
            return Manifold(self.batches, {int(k): int(n) for k, n in zip(*torch.unique(self.batches[0][1],
                                                                                            return_counts=True))})

        def evaluate(self, model, device="cpu"):
            return {"accuracy": 0.0}

        def example_inputs(self):
            return self.batches[0][0][:1]

    model = cifar_resnet8(width=4, in_channels=1, num_classes=3).eval()
    task = FiveClasses([patterns(4, classes=5, size=12)])
    with pytest.raises(DataError, match=r"S holds labels \[3, 4\] that the model cannot predict: it has 3 outputs"):
        check_coverage(task, task.manifold(0), model, task.example_inputs())
    x, y = patterns(4, size=12)
    x[6, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="non-finite values .*first in sample 6"):  # counted across batches
        check_finite_inputs(Manifold([(x[:4], y[:4]), (x[4:], y[4:])], {0: 4, 1: 4, 2: 4}))
    x[6, 0, 3, 3], x[9, 0, 0, 0] = 0.0, float("inf")
    with pytest.raises(DataError, match="first in sample 9"):
        check_finite_inputs(Manifold([(x, y)], {0: 4, 1: 4, 2: 4}))


def test_a_test_that_cannot_judge_the_scorer_is_named():
    from helpers_tiny import AlwaysNeutral

    from cswap.pairing import paired_for

    class Loss:
        higher_is_better = False

    with pytest.raises(ConfigError, match="test 'higher_only' cannot judge scorer 'loss' \\(lower-is-better\\)"):
        paired_for(AlwaysNeutral(), Loss(), "higher_only", "loss")  # the interface's default for_scorer
