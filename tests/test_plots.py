"""curve.png a person can read: twelve criteria in pairwise distinct styles, C-SWAP on top,
the legend outside the axes, y-limits around the data with a margin."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cswap.reports import CurveResult, curve_figure, plot_curves  # noqa: E402

CRITERIA = ["random", "magnitude", "cswap", "internal_influence", "conductance", "deeplift", "lrp", "taylor",
            "amp", "chip", "hrank", "fpgm"]


def _result() -> CurveResult:
    """Twelve criteria, two seeds, four ratios; accuracies between 40 % and 91 %."""
    rows = []
    for i, name in enumerate(CRITERIA):
        for seed in (0, 1):
            for t in (0.0, 0.3, 0.6, 0.9):
                rows.append({"criterion": name, "seed": seed, "target_ratio": t, "params_ratio": t,
                             "accuracy": 0.9 - t * (0.1 + 0.04 * i) / 0.9 * 0.9 + 0.005 * seed})
    return CurveResult("accuracy", unpruned=0.905, params_total=1000, rows=rows, analyses=[])


def test_every_criterion_has_its_own_style_and_cswap_is_on_top(tmp_path):
    fig = curve_figure(_result(), "twelve criteria")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in CRITERIA}
    assert sorted(lines) == sorted(CRITERIA)
    styles = {name: (matplotlib.colors.to_hex(line.get_color()), line.get_marker(), line.get_linestyle())
              for name, line in lines.items()}
    assert len(set(styles.values())) == 12  # pairwise distinct (colour, marker, line style)
    assert len({colour for colour, _, _ in styles.values()}) == 12  # and the colours alone, too
    top = max(artist.get_zorder() for artist in ax.get_children() if artist is not lines["cswap"])
    assert lines["cswap"].get_zorder() > top  # above the other curves, the unpruned line and the frame
    assert lines["cswap"].get_linewidth() > max(line.get_linewidth() for n, line in lines.items() if n != "cswap")
    # the legend sits right of the axes: it covers no point
    fig.canvas.draw()
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes_box.x1
    # y-limits hold every band and the unpruned line, none on the frame
    lo, hi = ax.get_ylim()
    values = [100 * r["accuracy"] for r in _result().rows] + [90.5]
    assert lo < min(values) - 0.5 and hi > max(values) + 0.5 and hi - lo < 1.5 * (max(values) - min(values)) + 2
    plt.close(fig)
    path = plot_curves(_result(), tmp_path / "curve.png")
    assert path.stat().st_size > 10_000
