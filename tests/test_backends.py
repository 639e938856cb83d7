"""Latency backends (cswap/backends.py): eager, channels_last and onnxruntime runners that
compute the model's outputs, timing in turns, and the spread that marks a timing untrusted."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cswap.backends import Runner, _timing, latencies_ms, measure, prepare, time_runners, untrusted_message
from cswap.errors import ConfigError


def _cnn(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def _x(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))


def _close(got, expected: torch.Tensor) -> None:
    got = torch.as_tensor(got)
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0)


@pytest.mark.parametrize("backend", ["torch", "torch_channels_last"])
def test_eager_runners_compute_the_model_and_leave_it_unchanged(backend):
    model = _cnn(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = prepare([model], _x(1), backend)[0]
    with torch.no_grad():
        _close(runner.run(runner.feed(_x(3))), model(_x(3)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last went to a copy


def test_onnxruntime_runners_take_any_batch_and_are_timed(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _cnn(8)
    runners = prepare([model], _x(1), "onnxruntime", threads=1, folder=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model0.onnx"]
    for batch in (1, 5):  # traced at batch 1: the file has a dynamic batch
        with torch.no_grad():
            _close(runners[0].run(runners[0].feed(_x(batch)))[0], model(_x(batch)))
    eager = prepare([model], _x(1), "torch")
    timings = time_runners(runners + eager, _x(4), repeats=5, warmup=1, min_seconds=0.0, backend="onnxruntime",
                           threads=1)  # runners of two backends can share the rounds
    assert [t.rounds for t in timings] == [5, 5] and all(t.median_ms > 0 and t.spread >= 0 for t in timings)
    assert {(t.backend, t.threads) for t in timings} == {("onnxruntime", 1)}


def test_models_are_timed_in_turns():
    """One call of each runner per round after the warm-up rounds, so load that comes and goes
    hits every model alike; each round starts one runner later, so none always follows the same one."""
    calls: list[str] = []
    runners = [Runner(lambda feed, n=name: calls.append(n), lambda x: x) for name in "abc"]
    timings = time_runners(runners, _x(1), repeats=4, warmup=2, min_seconds=0.0)
    assert "".join(calls) == "abc" * 2 + "abc" + "bca" + "cab" + "abc" and [t.rounds for t in timings] == [4, 4, 4]


def test_rounds_continue_until_min_seconds():
    runners = [Runner(lambda feed: None, lambda x: x)]
    few = time_runners(runners, _x(1), repeats=3, warmup=0, min_seconds=0.0)[0]
    more = time_runners(runners, _x(1), repeats=3, warmup=0, min_seconds=0.05)[0]
    assert few.rounds == 3 and 3 < more.rounds <= 150  # at most 50x the repeats


def test_spread_is_the_interquartile_range_over_the_median():
    wide = _timing([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], "torch", 1, 0.10)
    assert wide.median_ms == 5.0 and wide.spread == pytest.approx((7.0 - 3.0) / 5.0) and not wide.trusted
    assert wide.p10_ms == pytest.approx(1.8)  # the first decile, interpolated as statistics.quantiles does
    tight = _timing([10.0, 10.0, 10.0, 11.0], "onnxruntime", 2, 0.10)
    assert tight.spread == pytest.approx(0.25 / 10.0) and tight.trusted and tight.to_json()["threads"] == 2
    message = untrusted_message([tight, wide])
    assert "model 1 (80%)" in message and "model 0" not in message and "not trusted for a latency target" in message
    assert "idle machine" in message and "latency_repeats" in message and "\n" not in message
    assert untrusted_message([tight]) is None


def test_latencies_ms_has_the_call_shape_of_metrics():
    models = [_cnn(4), _cnn(2)]
    got = latencies_ms(models, _x(2), 3, 1, 0.0, backend="torch")  # positional as cswap.metrics.latencies_ms
    assert len(got) == 2 and all(ms > 0 for ms in got)
    timings = measure(models, _x(2), 3, 1, 0.0, max_spread=0.0)  # no timing has a spread <= 0 % in practice...
    assert all(t.trusted == (t.spread == 0.0) for t in timings)  # ... and the flag follows the threshold


def test_backend_refusals_are_one_line():
    with pytest.raises(ConfigError, match="unknown latency backend 'tensorrt'; backends: torch, torch_channels_last"):
        prepare([_cnn(2)], _x(1), "tensorrt")
    with pytest.raises(ConfigError, match="torch_channels_last needs image batches"):
        prepare([nn.Linear(4, 2)], torch.zeros(1, 4), "torch_channels_last")


@pytest.mark.parametrize("backend, overrides, expected", [
    ("onnxruntime", [], 4),  # the measured default for onnxruntime's blocked kernels
    ("onnxruntime", ["pruning.round_to=null"], None),  # an explicit choice wins, even "none"
    ("onnxruntime", ["pruning.round_to=8"], 8),
    ("torch", [], None),  # eager torch keeps the plan's exact widths
])
def test_a_target_gets_the_alignment_of_its_latency_backend(backend, overrides, expected):
    import yaml

    from cswap.config import dump_config, load_config, parse_config

    from cswap.demo import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [f"output.latency_backend={backend}", *overrides])
    assert cfg.pruning.round_to == expected
    assert parse_config(yaml.safe_load(dump_config(cfg))).pruning.round_to == expected  # a resume reads the same
