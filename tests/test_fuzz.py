"""Fuzzing what a user names or receives (issue 25, item 6): the shipped configs and a real run
directory, mutated (types, ranges, YAML tags, truncation, missing and garbage files, mmseg
`.py` and tagged-YAML configs), through the CLI (`cswap.cli.main`, in-process) and the API
(`cswap.load_pruned`).

The property, for every mutation: success, or exit status 2 (a `CSwapError` from the API)
with exactly one `error:` line and no traceback. Never exit 1 (an exception escaping `main`),
never code executed (every payload would create MARKER), never a file outside `--out`
touched (the whole working tree is snapshotted around each call).

Mutations are drawn with `random.Random(CSWAP_FUZZ_SEED)` (default 0), so a failure is
replayed by its seed and index. The default run tries a few dozen (under a minute here); the
`slow` variant tries hundreds, including the large models' configs. Dry runs use `--dry-run`
(the analysis is not the point); a few `--set`s applied after the mutation keep a valid
mutant's dry run to seconds (a tiny DDRNet, a small S), so only those keys escape mutation
for those configs (the demo config is mutated with none).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cswap
from cswap.cli import main
from cswap.errors import CSwapError
from cswap.models.cifar_resnet import cifar_resnet8

from conftest import TEST_THREADS, patterns

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CSWAP_FUZZ_SEED", "0"))
MARKER_NAME = "PWNED"
TINY_DDRNET = [f"model.kwargs.cfg_options.model.{k}={v}" for k, v in (
    ("backbone.channels", 4), ("backbone.ppm_channels", 8), ("decode_head.in_channels", 16),
    ("decode_head.channels", 8))] + ["task.options.scale=[64, 32]"]
FAST = {  # shipped config -> --set items applied after the mutation (keep a valid mutant's dry run short)
    "demo": [],
    "ddrnet23s_cityscapes": TINY_DDRNET,
    "fashion_mnist_resnet20": ["task.options.samples_per_class=2"],
    "fashion_mnist_resnet20_w8": ["task.options.samples_per_class=2"],
    "fashion_mnist_mobilenetv2": ["task.options.samples_per_class=2"],
}
SLOW_ONLY = {  # larger models: their valid mutants trace for seconds to a minute each
    "resnet18_cifar10": ["task.options.samples_per_class=2"],
    "fashion_mnist_resnet20_w32": ["task.options.samples_per_class=2"],
    "fashion_mnist_vit_p7_d128": ["task.options.samples_per_class=2"],
    "mobilenetv2_imagenet10": ["task.options.samples_per_class=2"],
    "resnet50_imagenet10": ["task.options.samples_per_class=2"],
    "vit_b16_imagenet10": ["task.options.samples_per_class=2"],
    "retinanet_coco": ["task.options.samples_per_class=2"],
}


# ---- mutations -------------------------------------------------------------------------------
def _evil_values(marker: Path) -> list:
    return [None, -1, 0, 1, 2**40, -2**63, 1e300, float("nan"), float("inf"), "", "abc", "../../outside", "/",
            True, [], {}, [1, -2, "x"], {"type": "os.system", "command": f"touch {marker}"}, "1e999", "\x00"]


def _tags(marker: Path) -> list[str]:
    return [f"!!python/object/apply:os.system ['touch {marker}']",
            f"!!python/object/new:os.system ['touch {marker}']",
            "!!python/name:os.system", "!!python/module:os", "!!binary aGVsbG8=", "!!set {a, b}",
            f"!!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]"]


def _paths(node, prefix=()):
    """Every key path of a YAML/JSON tree (mappings and lists), outermost first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate_tree(data, rng: random.Random, marker: Path):
    """One structural mutation: a value replaced, a key deleted, an unknown key added."""
    data = json.loads(json.dumps(data, allow_nan=True))
    paths = [p for p in _paths(data) if p]
    path = rng.choice(paths)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    op = rng.choice(("replace", "replace", "replace", "delete", "add"))
    if op == "replace":
        parent[path[-1]] = rng.choice(_evil_values(marker))
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[rng.choice(("surprise", "_base_", "custom_imports", "allow_pickle", "trust_python_config"))] = \
            rng.choice(_evil_values(marker))
    return data, f"{op} {'.'.join(map(str, path))}"


def _mutate_text(text: str, rng: random.Random, marker: Path) -> tuple[str | bytes, str]:
    """One textual mutation: truncation, a YAML tag, aliases, duplicate keys, bytes."""
    op = rng.choice(("truncate", "tag_value", "tag_line", "aliases", "duplicate", "bytes", "empty"))
    if op == "truncate":
        return text[: rng.randrange(len(text))], op
    if op == "tag_value":
        lines = text.splitlines()
        candidates = [i for i, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("#")]
        i = rng.choice(candidates)
        key = lines[i].split(": ", 1)[0]
        lines[i] = f"{key}: {rng.choice(_tags(marker))}"
        return "\n".join(lines) + "\n", f"{op} line {i + 1}"
    if op == "tag_line":
        return f"pwn: {rng.choice(_tags(marker))}\n" + text, op
    if op == "aliases":  # a small "billion laughs": aliases must not blow up memory or time
        bomb = ("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                "c: &c [*b, *b, *b, *b, *b, *b]\n")
        return bomb + text, op
    if op == "duplicate":
        return text + text, op
    if op == "bytes":
        return bytes(rng.randrange(256) for _ in range(200)), op
    return "", op


# ---- running one mutation and checking the property -----------------------------------------
def _snapshot(root: Path, skip: Path) -> dict:
    """(size, mtime, inode) of every path under `root` except under `skip` (the --out)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            seen[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return seen


class Checker:
    """Runs calls and records every breach of the property with the mutation that caused it."""

    def __init__(self, root: Path, marker: Path, capsys):
        self.root, self.marker, self.capsys = root, marker, capsys
        self.tried, self.failures = 0, []

    def cli(self, what: str, argv: list[str], out: Path) -> None:
        self._check(what, lambda: self._main(argv), out)

    def api(self, what: str, call, out: Path) -> None:
        def run():
            try:
                call()
            except CSwapError as exc:
                return 2, f"error: {exc}\n"
            return 0, ""
        self._check(what, run, out)

    def _main(self, argv):
        return main(argv), self.capsys.readouterr().err

    def _check(self, what: str, run, out: Path) -> None:
        self.tried += 1
        self.capsys.readouterr()
        before = _snapshot(self.root, out)
        try:
            status, err = run()
        except BaseException as exc:  # exit 1: anything escaping is a breach
            self.failures.append(f"{what}: raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}")
            return
        finally:
            torch.set_num_threads(TEST_THREADS)  # a mutant may have set `threads`
        lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING ")]
        if status == 2 and not (len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err):
            self.failures.append(f"{what}: exit 2 but not one error line: {err!r}")
        elif status not in (0, 2):
            self.failures.append(f"{what}: exit {status}: {err!r}")
        if self.marker.exists():
            self.failures.append(f"{what}: CODE RAN (marker created)")
            self.marker.unlink()
        after = _snapshot(self.root, out)
        changed = sorted(str(p) for p in set(before) ^ set(after) | {p for p in before if before[p] != after.get(p)})
        if changed:
            self.failures.append(f"{what}: touched outside --out: {changed[:5]}")

    def report(self, label: str) -> None:
        held = self.tried - len(self.failures)
        with self.capsys.disabled():
            print(f"\nfuzz {label} (seed {SEED}): {self.tried} mutations tried, {held} held")
        assert not self.failures, "\n".join(self.failures[:20])


# ---- the shipped configs ---------------------------------------------------------------------
def _shipped(names) -> dict[str, Path]:
    from cswap.packaged import packaged_configs

    configs = packaged_configs()
    return {name: configs[name] for name in names if name in configs}


def _resolved_text(path: Path) -> str:
    """The config with its relative paths made absolute (so a copy elsewhere finds its files)."""
    from cswap.config import load_config_text, resolve_relative_paths

    data = resolve_relative_paths(load_config_text(path.read_text(), path), path.resolve().parent)
    return yaml.safe_dump(data, sort_keys=False)


def _mmseg_payloads(case: Path, marker: Path, rng: random.Random) -> tuple[dict, str]:
    """An mmseg config that would run code if read unsafely: a `.py`, or YAML with a tag."""
    if rng.random() < 0.5:
        evil = case / "mmseg_config.py"
        evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    else:
        evil = case / "mmseg_config.yaml"
        evil.write_text(f"model: {rng.choice(_tags(marker))}\n")
    return {"source": "cswap", "name": "mmseg", "kwargs": {"config": str(evil)}}, f"mmseg config {evil.name}"


def _config_mutant(name: str, source: Path, case: Path, rng: random.Random, marker: Path) -> tuple[Path, str]:
    text = _resolved_text(source)
    path = case / f"{name}.yaml"
    kind = rng.random()
    if kind < 0.55:
        data, what = _mutate_tree(yaml.safe_load(text), rng, marker)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    elif kind < 0.9:
        mutated, what = _mutate_text(text, rng, marker)
        (path.write_bytes if isinstance(mutated, bytes) else path.write_text)(mutated)
    else:
        data = yaml.safe_load(text)
        data["model"], what = _mmseg_payloads(case, marker, rng)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, what


def _fuzz_configs(checker: Checker, configs: dict, count: int, rng: random.Random, work: Path) -> None:
    fast = {**FAST, **SLOW_ONLY}
    for i in range(count):
        name = rng.choice(sorted(configs))
        case = work / f"config-{i}"
        case.mkdir()
        path, what = _config_mutant(name, configs[name], case, rng, checker.marker)
        extra = [item for s in fast[name] for item in ("--set", s)]
        out = case / "out"
        checker.cli(f"[{i}] {name}: {what}", ["prune", str(path), "--dry-run", "--out", str(out), *extra], out)


# ---- a real run directory ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of a tiny CIFAR ResNet-8 on a tiny npz data set, made once (seconds)."""
    root = tmp_path_factory.mktemp("fuzz-run")
    x, y = patterns(30, size=12, seed=3)
    images = x.clamp(-1, 2).add(1).div(3).mul(255).to(torch.uint8).squeeze(1).numpy()
    perm = np.random.default_rng(0).permutation(len(y))
    np.savez_compressed(root / "tiny.npz", manifold_images=images[perm[:60]], manifold_labels=y.numpy()[perm[:60]],
                        eval_images=images[perm[60:]], eval_labels=y.numpy()[perm[60:]])
    torch.manual_seed(0)
    torch.save(cifar_resnet8(width=4, in_channels=1, num_classes=3).state_dict(), root / "model.pt")
    cfg = {"name": "tiny", "seed": 1, "threads": TEST_THREADS,
           "model": {"source": "cswap", "name": "cifar_resnet8", "weights": "model.pt",
                     "kwargs": {"width": 4, "in_channels": 1, "num_classes": 3}},
           "task": {"name": "classification", "options": {"dataset": "npz", "root": "tiny.npz", "samples_per_class": 12,
                                                           "manifold_split": "manifold", "eval_split": "eval"}},
           "pruning": {"params_ratio": 0.3}, "output": {"dir": "runs", "latency_repeats": 2}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prune", str(root / "tiny.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


class _Pickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _mutate_run(case: Path, rng: random.Random, marker: Path) -> str:
    """One mutation of one file of the run directory copied to `case`."""
    files = sorted(p for p in case.iterdir() if p.is_file())
    target = rng.choice(files)
    roll = rng.random()
    if roll < 0.1:
        target.unlink()
        return f"deleted {target.name}"
    if target.suffix not in (".json", ".yaml", ".txt", ".csv", ".py"):  # checkpoints, plots: bytes
        op = rng.choice(("truncate", "garbage", "pickle", "empty"))
        data = target.read_bytes()
        target.write_bytes({"truncate": data[: rng.randrange(max(1, len(data)))], "empty": b"",
                            "garbage": bytes(rng.randrange(256) for _ in range(512)),
                            "pickle": pickle.dumps({"fc.weight": _Pickled(marker)})}[op])
        return f"{op} {target.name}"
    text = target.read_text()
    if target.name == "config.yaml" and roll < 0.25:
        data = yaml.safe_load(text)
        data["model"], what = _mmseg_payloads(case, marker, rng)
        target.write_text(yaml.safe_dump(data))
        return f"config.yaml: {what}"
    if target.suffix in (".json", ".yaml") and roll < 0.7:
        loads = json.loads if target.suffix == ".json" else yaml.safe_load
        try:
            data, what = _mutate_tree(loads(text), rng, marker)
        except (ValueError, yaml.YAMLError, IndexError):
            data, what = None, "unparsable to start with"
        if data is not None:
            target.write_text(json.dumps(data) if target.suffix == ".json" else yaml.safe_dump(data))
        return f"{target.name}: {what}"
    mutated, what = _mutate_text(text, rng, marker)
    (target.write_bytes if isinstance(mutated, bytes) else target.write_text)(mutated)
    return f"{target.name}: {what}"


def _fuzz_run_dirs(checker: Checker, base: Path, count: int, rng: random.Random, work: Path,
                   export_every: int) -> None:
    for i in range(count):
        case = work / f"run-{i}"
        shutil.copytree(base, case)
        what = f"[{i}] run: {_mutate_run(case, rng, checker.marker)}"
        out = work / f"out-{i}"
        checker.api(f"{what} (load_pruned)", lambda: cswap.load_pruned(case), out)
        if i % export_every == 0:  # an export takes seconds (ONNX, onnxruntime): not every mutant
            checker.cli(f"{what} (export)", ["export", str(case), "--static", "--out", str(out / "m.onnx")], out)


def _fuzz(tmp_path, monkeypatch, capsys, run_dir, names, configs: int, runs: int, label: str,
          export_every: int) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder is in the snapshot
    marker = tmp_path / MARKER_NAME
    checker = Checker(tmp_path, marker, capsys)
    rng = random.Random(SEED)
    _fuzz_configs(checker, _shipped(names), configs, rng, tmp_path)
    _fuzz_run_dirs(checker, run_dir, runs, rng, tmp_path, export_every)
    checker.report(label)


def test_fuzz_configs_and_run_directories(tmp_path, monkeypatch, capsys, run_dir, one_thread):
    _fuzz(tmp_path, monkeypatch, capsys, run_dir, FAST, configs=30, runs=20, label="default",
          export_every=10)


@pytest.mark.slow
def test_fuzz_many(tmp_path, monkeypatch, capsys, run_dir, one_thread):
    _fuzz(tmp_path, monkeypatch, capsys, run_dir, {**FAST, **SLOW_ONLY}, configs=200, runs=150, label="slow",
          export_every=3)
