"""The scoring-function contract, honoured by the core: the declared direction
(`higher_is_better`) and range (`positive`) reach the test, what `score` returns is checked,
plugin options are validated by `--dry-run`, and a broken entry point is one clear error."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cswap
from cswap import registry
from cswap.causal import PairedTTest
from cswap.errors import ConfigError

SCORERS = '''
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from cswap.interfaces import Scores, ScoringFunction


def _p(outputs, targets):
    logp = torch.log_softmax(outputs.detach().double(), 1)
    return logp.gather(1, targets.view(-1, 1)).squeeze(1).exp()


class Energy(ScoringFunction):
    """-p_y: lower is better, never positive."""
    higher_is_better = False
    positive = False

    def score(self, outputs, targets):
        return Scores((-_p(outputs, targets)).numpy(), targets.numpy().astype(np.int64))


class EnergyIgnoringDirection(Energy):
    """The same values declared higher-is-better: what the core did before it read the declaration."""
    higher_is_better = True


class InverseProbability(ScoringFunction):
    """1 / p_y: lower is better and positive, so the relative effect applies."""
    higher_is_better = False
    positive = True

    def score(self, outputs, targets):
        return Scores((1 / _p(outputs, targets)).numpy(), targets.numpy().astype(np.int64))


class Margin(ScoringFunction):
    """p_y - max other p: in [-1, 1], declared as such."""
    positive = False

    def score(self, outputs, targets):
        p = torch.softmax(outputs.detach().double(), 1)
        true = p.gather(1, targets.view(-1, 1)).squeeze(1)
        other = p.scatter(1, targets.view(-1, 1), -1.0).max(1).values
        return Scores((true - other).numpy(), targets.numpy().astype(np.int64))


class UndeclaredMargin(Margin):
    positive = None


class TensorScores(ScoringFunction):
    def score(self, outputs, targets):
        return Scores(_p(outputs, targets), targets.numpy().astype(np.int64))


class Tempered(ScoringFunction):
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        temperature: float = 2.0

    def score(self, outputs, targets):
        return Scores(_p(outputs / self.options.temperature, targets).numpy(), targets.numpy().astype(np.int64))
'''

ENTRY_POINTS = {
    "energy": "Energy", "energy_wrong_direction": "EnergyIgnoringDirection", "inverse_p": "InverseProbability",
    "margin": "Margin", "margin_undeclared": "UndeclaredMargin", "tensor_scores": "TensorScores",
    "tempered": "Tempered", "typo": "Typo",
}


@pytest.fixture()
def scorers(tmp_path, monkeypatch):
    """A distribution `contract-scores` registering the scorers above (and one broken entry point)."""
    (tmp_path / "contract_scores.py").write_text(SCORERS)
    info = tmp_path / "contract_scores-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: contract-scores\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[cswap.scorers]\n" + "".join(f"{k} = contract_scores:{v}\n" for k, v in ENTRY_POINTS.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _plan(model, x, y, scorer, **test_options):
    """The plan's JSON without the record of which scorer made it (the rest must not depend on it)."""
    plan = cswap.analyze(model, (x, y), samples_per_class=40, scorer=scorer, test_options=test_options or None,
                         progress=False).to_json()
    assert plan.pop("scorer")["name"] == scorer
    return plan


def test_lower_is_better_scorer_gives_the_plan_of_the_negated_higher_is_better_scorer(scorers, trained_mlp):
    """-p with higher_is_better = False is p, seen from the other side: with the absolute
    effect every effect, p-value and verdict is the same number (negation is exact in IEEE
    arithmetic), so the plans are equal to the last bit. (-p cannot take the relative effect:
    it is never positive; the next test covers a positive lower-is-better score.)"""
    model, x, y = trained_mlp
    theirs = _plan(model, x, y, "energy", effect="absolute")
    ours = _plan(model, x, y, "class_probability", effect="absolute")
    assert theirs == ours
    counts = cswap.PruningPlan.from_json(ours).category_counts()
    assert counts["critical"] > 0 and counts["neutral"] + counts["detrimental"] > 0  # both verdicts occur
    # ignoring the declared direction (the old behaviour) prunes differently
    assert _plan(model, x, y, "energy_wrong_direction", effect="absolute")["steps"] != ours["steps"]


def test_relative_effect_of_a_lower_is_better_positive_score_flips_its_sign(scorers):
    inverse = registry.create("scorers", "inverse_p")
    test = PairedTTest(PairedTTest.Options(effect="relative")).for_scorer(inverse)
    sigma = np.array([2.0, 4.0, 1.5, 3.0])
    star = np.array([1.0, 5.0, 1.5, 1.0])  # three samples better (lower), one worse
    expected = np.mean((sigma - star) / sigma)
    assert test.effect(sigma, star).mean() == pytest.approx(expected, rel=1e-15)
    assert test.decide(sigma, star[None], np.zeros(4, dtype=np.int64))[0].xi == pytest.approx(expected, rel=1e-15)
    # with_alpha keeps the direction
    assert test.with_alpha(0.2).effect(sigma, star).mean() == pytest.approx(expected, rel=1e-15)


def test_margin_scorer_with_the_relative_effect_is_refused_naming_the_scorer(scorers, trained_mlp):
    model, x, y = trained_mlp
    # declared: refused before any forward pass
    with pytest.raises(ConfigError, match=r"scorer 'margin' \(Margin\) declares that its values can be <= 0.*"
                                          r"effect: absolute"):
        _plan(model, x, y, "margin", effect="relative")
    # not declared: refused on the baseline sigma, with how many observations are not positive (here
    # once the paper's rule has removed units and sigma, updated after each removal, reaches 0)
    with pytest.raises(ConfigError, match=r"scorer 'margin_undeclared' \(UndeclaredMargin\) gave \d+ of 120 "
                                          r"baseline observations <= 0"):
        _plan(model, x, y, "margin_undeclared", effect="relative", neutral="not_significant")
    # the absolute effect needs no positive sigma
    assert _plan(model, x, y, "margin", effect="absolute")["steps"]


def test_scores_that_break_the_contract_are_refused_naming_the_scorer(scorers, trained_mlp):
    model, x, y = trained_mlp
    with pytest.raises(ConfigError, match=r"scorer 'tensor_scores' \(TensorScores\) broke the scoring contract: "
                                          r"Scores.values is a torch.Tensor, not a numpy array"):
        _plan(model, x, y, "tensor_scores")


def _cli(args, env_path=None, cwd=None):
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "cswap", *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_dry_run_validates_every_plugin_option_and_creates_nothing(scorers, config, tmp_path):
    runs = tmp_path / "runs"
    out = _cli(["prune", str(config), "--dry-run", "--set", "scorer.name=tempered",
                "--set", "scorer.options.temprature=3"], scorers)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: invalid options for scorer 'tempered': temprature: Extra inputs are not permitted")
    ok = _cli(["prune", str(config), "--dry-run", "--set", "scorer.name=tempered",
               "--set", "scorer.options.temperature=3"], scorers)
    assert ok.returncode == 0, ok.stderr
    assert not runs.exists()  # a dry run writes nothing


def test_broken_entry_point_is_one_error_naming_it_and_list_marks_it(scorers, config):
    out = _cli(["prune", str(config), "--dry-run", "--set", "scorer.name=typo"], scorers)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: scorer 'typo' = contract_scores:Typo of contract-scores 0.1 at ")
    assert "cannot be loaded: AttributeError: module 'contract_scores' has no attribute 'Typo'" in line
    listing = _cli(["list"], scorers)
    assert listing.returncode == 0
    row = next(l for l in listing.stdout.splitlines() if l.strip().startswith("typo "))
    assert "BROKEN" in row and "has no attribute 'Typo'" in row
    assert "BROKEN" not in next(l for l in listing.stdout.splitlines() if l.strip().startswith("energy "))


def test_builtin_scorers_declare_their_range():
    assert registry.create("scorers", "class_probability").positive is True
    assert registry.create("scorers", "miou").positive is True
    assert registry.create("scorers", "miou", {"smooth": 0}).positive is False
    assert registry.create("scorers", "detection_match", {"floor": 0}).positive is False


def test_label_outside_the_model_outputs_names_the_cause():
    from cswap.errors import DataError

    scorer = registry.create("scorers", "class_probability")
    with pytest.raises(DataError, match=r"labels range over 0..3 but the model has 3 outputs"):
        scorer.score(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
