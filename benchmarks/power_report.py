"""docs/results/power.md and power.json from the cached results of benchmarks/power.py."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

CATEGORIES = ("neutral", "detrimental", "inconclusive", "critical")
HEADER = """# Neutral must mean harmless: power, equivalence and small sample sets (issue #26)

Made by `python benchmarks/power.py` (resumable; `--report-only` rebuilds this page from the
cached results; the commands of this page are at its end). For every model, M_k (samples per
class in S), rule and seed: one C-SWAP
analysis with the model's config (effect absolute, per-class voting, alpha 0.05, no
correction), its plan replayed at the non-critical point (every unit the analysis removed)
and at 50 % of the parameters removed, without recovery and with least squares calibrated on
S itself (the run's default), accuracy on the held-out split. Rules: `not_significant` is the
paper's (a unit is neutral when no class's t-test rejects); `equivalent:δ` calls a unit
neutral only when TOST shows its mean change of σ within ±δ in every class (δ in σ's units:
0.02 = 2 points of true-class probability), and keeps the rest as *inconclusive*. MDE is the
minimum detectable effect of the t-test on S (cswap/power.py: the worst class, what the
warning speaks of, and the median class; 80 % power), in points of true-class probability.
"held-out" counts the least-squares re-fits whose
system had fewer than 4 rows per column, so their ridge was chosen on held-out samples
(cswap/heldout.py; `/n` of them left unrepaired), and "plain LS" the accuracy the re-fit as it was
before (every system solved as if well determined) gives on the same plan, where it differs
(`–`: not measured, or no system was under-determined). Mean ± standard deviation over the seeds
(the seed draws S and orders the units); one torch thread per process, two or three
processes at once on a shared 2-core machine that was not idle (other sessions' jobs ran
beside them, load average 6-10): compare times within a table only.

Data: the demo ships with the package; ResNet-20 w8 reads the full Fashion-MNIST
(`apt-get install dataset-fashion-mnist`, or CSWAP_FASHION_MNIST=DIR; benchmarks/datasets.py)
and its committed checkpoint in benchmarks/checkpoints/ (`configs/fashion_mnist_resnet20_w8.yaml`);
the ViT (`configs/fashion_mnist_vit_p7_d128.yaml`, timm) likewise.
"""
READING = Path(__file__).with_name("power_reading.md")  # the hand-written reading, appended


def _load(work: Path) -> dict[str, dict]:
    models = {}
    for folder in sorted(p for p in work.iterdir() if p.is_dir()):
        unpruned = folder / "unpruned.json"
        rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*-m*-seed*.json"))]
        if unpruned.is_file() and rows:
            models[folder.name] = {"unpruned": json.loads(unpruned.read_text()), "rows": rows}
    return models


def _cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float) * scale
    if not len(v):
        return "–"
    return f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")


def _replay(row: dict, key: str) -> float | None:
    r = row["replays"].get(key)
    return None if r is None else r["accuracy"]


def _held_out(rows: list[dict]) -> str:
    fits = [r["replays"].get("noncritical/least_squares", {}) for r in rows]
    measured = sum(f.get("held_out_fits", 0) for f in fits)
    left = sum(f.get("left_unrepaired", 0) for f in fits)
    return f"{measured / len(rows):.1f}/{left / len(rows):.1f}"


def _table(model: str, data: dict) -> list[str]:
    base = 100 * data["unpruned"]["accuracy"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        groups[(r["samples_per_class"], r["rule"])].append(r)
    lines = [f"## {model} (unpruned {base:.2f} %, {data['unpruned']['units']} units)", "",
             "| M_k | rule | seeds | MDE (worst / median class) | neutral | detr. | inconcl. | critical | "
             "non-crit. params | "
             "acc non-crit. (none / LS) | acc 50 % (none / LS) | held-out/unrepaired | plain LS (non-crit. / 50 %) | "
             "analysis s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|"]
    order = sorted(groups, key=lambda k: (k[0], k[1] != "not_significant", k[1]))
    for m, rule in order:
        rows = groups[(m, rule)]
        mde = [r["power"]["detectable_effect"] for r in rows]
        median = [r["power"]["median_detectable_effect"] for r in rows]
        cats = " | ".join(_cell([r[c] for r in rows]) for c in CATEGORIES)
        acc = {k: _cell([_replay(r, k) for r in rows], 100) for k in
               ("noncritical/none", "noncritical/least_squares", "half/none", "half/least_squares",
                "noncritical/least_squares_plain", "half/least_squares_plain")}
        lines.append(f"| {m} | {rule} | {len(rows)} | {_cell(mde, 100)} / {_cell(median, 100)} | {cats} | "
                     f"{_cell([r['noncritical_params_ratio'] for r in rows], 100)} % | "
                     f"{acc['noncritical/none']} / {acc['noncritical/least_squares']} | "
                     f"{acc['half/none']} / {acc['half/least_squares']} | {_held_out(rows)} | "
                     f"{acc['noncritical/least_squares_plain']} / {acc['half/least_squares_plain']} | "
                     f"{_cell([r['analysis_seconds'] for r in rows], digits=0)} |")
    return lines + [""]


def write_report(work: Path, out: Path) -> str:
    models = _load(work)
    out.mkdir(parents=True, exist_ok=True)
    # every number of the tables; the plans stay in the work folder (megabytes each model)
    slim = {m: {**d, "rows": [{k: v for k, v in r.items() if k != "plan"} for r in d["rows"]]}
            for m, d in models.items()}
    (out / "power.json").write_text(json.dumps(slim, indent=1) + "\n")
    lines = HEADER.splitlines() + [""]
    for model, data in models.items():
        lines += _table(model, data)
    if READING.is_file():
        lines += READING.read_text().splitlines()
    path = out / "power.md"
    path.write_text("\n".join(lines) + "\n")
    return f"wrote {path} ({sum(len(d['rows']) for d in models.values())} results)"
