"""benchmarks/gpu_check.py --smoke: the GPU check's code runs on CPU, so it cannot rot between GPU loans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_passing_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    removal = correctness["cut_equals_removal"]
    assert len(removal) == 3 and all(d["ok"] and d["units"] > 0 and d["effect"] > 0 for d in removal.values())
    assert all(d["diff64"] <= 1e-9 * max(d["scale"], 1.0) for d in removal.values())
    assert correctness["staged_scores_equal_full"]["ok"] and correctness["staged_scores_equal_full"]["units"] >= 2
    assert correctness["staged_plan_equals_naive"]["ok"]
    batches = correctness["unit_batch"]
    assert batches["unit_batch_auto"]["ok"] and batches["unit_batch_3"]["ok"]
    assert "skipped" in correctness["out_of_memory"]  # no CUDA here: said, not faked

    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["staged_subset"]["plan_identical_to_naive"]
    assert timing["staged_unit_batch_auto"]["plan_identical_to_staged"]
    env = timing["environment"]  # every unit tested, but a layer's last one when all others were removed
    assert env["units"] - env["layers"] <= timing["staged"]["units_tested"] <= env["units"]
    assert timing["naive_subset"]["units_tested"] < timing["staged"]["units_tested"]
    assert timing["naive_all_layers_estimate_s"] > 0 and timing["staged"]["seconds"] > 0

    precision = json.loads((tmp_path / "precision.json").read_text())
    assert "skipped" in precision["tf32"]  # refused off CUDA
    bf16 = precision["bf16"]
    assert bf16["meta_precision"] == "bf16"
    assert env["units"] - env["layers"] <= bf16["units_tested"] <= env["units"]
    assert 0 <= bf16["max_abs_delta_xi"] < 1.0  # xi is a relative effect; bf16 moves it by round-off, not by O(1)
    summary = (tmp_path / "summary.md").read_text()
    assert "**NO**" not in summary and "| bf16 |" in summary
