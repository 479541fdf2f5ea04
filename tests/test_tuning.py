"""Hyper-parameter search (easymlops.tuning): the ordered ASHA rule against Ray's own ASHA, then
real searches on the stack's Ray head (crashing trials, early stopping, determinism) and their
nested MLflow runs on the stack's MLflow server."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from sklearn.datasets import make_classification

from easymlops import tuning
from easymlops.settings import Settings

FEATURES = [f"x{i}" for i in range(12)]
MAX_ROUNDS = 60
EARLY_STOPPING = 20
GRACE, RF = 5, 3.0  # rungs at rounds 5, 15, 45
# Trials alternate a strong and a weak shape (depth-1 stumps on a quarter of the columns);
# every third one asks for subsample=1.5, which xgboost rejects when training starts.
OVERRIDES = {
    "max_depth": [6, 1],
    "colsample_bytree": [1.0, 0.25],
    "subsample": [0.8, 0.8, 1.5],
}
TRIALS = 6

# ---- pure parts ----------------------------------------------------------------------------


def test_sampled_configs_depend_only_on_the_seed_and_overrides_touch_only_their_keys() -> None:
    a = tuning.sample_configs(5, seed=7, threads_per_trial=1)
    assert a == tuning.sample_configs(5, seed=7, threads_per_trial=1)
    assert a != tuning.sample_configs(5, seed=8, threads_per_trial=1)
    assert len({c["eta"] for c in a}) == 5
    for config in a:
        assert 2 <= config["max_depth"] <= 10 and 0.01 <= config["eta"] <= 0.3
        assert config["objective"] == "binary:logistic" and config["nthread"] == 1
    b = tuning.sample_configs(5, seed=7, threads_per_trial=1, space_overrides={"eta": [0.1, 0.2]})
    assert [c["eta"] for c in b] == [0.1, 0.2, 0.1, 0.2, 0.1]
    assert [{**c, "eta": 0} for c in a] == [{**c, "eta": 0} for c in b]
    with pytest.raises(ValueError, match="objective"):
        tuning.sample_configs(1, seed=7, threads_per_trial=1, space_overrides={"objective": "x"})


def test_milestones_follow_grace_times_powers_of_the_reduction_factor() -> None:
    assert tuning.milestones(grace_rounds=10, reduction_factor=3, max_rounds=400) == (
        10,
        30,
        90,
        270,
    )
    assert tuning.milestones(grace_rounds=5, reduction_factor=3, max_rounds=45) == (5, 15)


def _ray_asha_sequential(curves: list[list[float]], rungs: tuple[int, ...]) -> dict[int, int]:
    """Ray's ASHA bracket, fed the trials one after the other: index -> milestone it stops at."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    bracket = _Bracket(min_t=rungs[0], max_t=rungs[-1] + 1, reduction_factor=RF, s=0)
    assert [m for m, _ in reversed(bracket._rungs)] == list(rungs)
    stops = {}
    for index, curve in enumerate(curves):
        trial: Any = SimpleNamespace(trial_id=str(index))  # all the bracket reads of a Trial
        for milestone in rungs:
            if milestone > len(curve):
                break
            if bracket.on_result(trial, milestone, curve[milestone - 1]) == TrialScheduler.STOP:
                stops[index] = milestone
                break
    return stops


def test_ordered_rule_gives_ray_asha_sequential_decisions_whatever_the_interleaving() -> None:
    """Trials run concurrently and report in a random interleaving; each is stopped as soon as
    the rule settles it. The final verdicts equal Ray's ASHA run on the trials one at a time."""
    rungs = (5, 15, 45)
    for case in range(200):
        rng = random.Random(case)
        curves = []
        for _ in range(rng.randint(2, 9)):
            steps = np.cumsum([rng.random() ** 3 for _ in range(rng.randint(1, 60))])
            curves.append([float(v) for v in steps / (1 + steps[-1]) * rng.uniform(0.5, 1)])
        expected = _ray_asha_sequential(curves, rungs)

        live = tuning._Rungs(rungs, RF)
        concurrency = rng.randint(1, 3)
        waiting = list(range(len(curves)))
        running: dict[int, int] = {}  # index -> rounds so far
        reported: dict[int, int] = {}
        while waiting or running:
            while waiting and len(running) < concurrency:
                index = waiting.pop(0)  # first in, first out, as Tune starts them
                live.add(index)
                running[index] = 0
            index = rng.choice(sorted(running))
            running[index] += 1
            round_ = running[index]
            live.record(index, round_, curves[index][round_ - 1])
            reported[index] = round_
            stopped = live.stops().get(index) is not None
            if stopped or round_ == len(curves[index]):
                del running[index]
                live.finish(index)
        final = tuning._Rungs(rungs, RF)
        for index, curve in enumerate(curves):
            final.add(index)
            for milestone in rungs:
                if milestone <= reported[index]:
                    final.record(index, milestone, curve[milestone - 1])
            final.finish(index)
        verdicts = {i: m for i, m in final.stops().items() if m is not None}
        assert verdicts == expected, f"case {case}"
        assert {i: m for i, m in live.stops().items() if m is not None} == expected


# ---- on the stack's Ray head ---------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = make_classification(
        n_samples=3000, n_features=12, n_informative=6, flip_y=0.1, random_state=3
    )
    return x[:2400], y[:2400], x[2400:], y[2400:]


@pytest.fixture(scope="module")
def attached(stack: Settings) -> Iterator[Settings]:
    """This process attached to the stack's Ray once for the module (each search then reuses
    it, as a Dagster run that is already attached would), and detached at its end: a driver
    left attached is killed by Ray once the stack's head is gone."""
    import ray

    initialized = tuning.attach_ray(stack.ray)
    try:
        yield stack
    finally:
        if initialized:
            ray.shutdown()


def _search(
    stack: Settings, data: tuple, *, concurrency: int, **kwargs: object
) -> tuning.SearchResult:
    options: dict = dict(
        feature_names=FEATURES,
        trials=TRIALS,
        time_budget_s=240,
        concurrency=concurrency,
        threads_per_trial=1,
        seed=7,
        max_rounds=MAX_ROUNDS,
        early_stopping_rounds=EARLY_STOPPING,
        ray_address=stack.ray,
        space_overrides=OVERRIDES,
        grace_rounds=GRACE,
        reduction_factor=RF,
    )
    return tuning.search(*data, **(options | kwargs))


@pytest.fixture(scope="module")
def searched(attached: Settings, data: tuple) -> tuple[tuning.SearchResult, list[str]]:
    lines: list[str] = []
    # Progress goes to a logger that cannot be pickled, as Dagster's context.log (Tune pickles
    # its callbacks; the search must not take the progress function along).
    logger = logging.Logger("unregistered, so not picklable")
    logger.addHandler(logging.StreamHandler())

    def progress(line: str) -> None:
        logger.info(line)
        lines.append(line)

    return _search(attached, data, concurrency=2, progress=progress), lines


@pytest.fixture(scope="module")
def sequential(data: tuple) -> tuning.SearchResult:
    return tuning.sequential_search(
        *data,
        feature_names=FEATURES,
        trials=TRIALS,
        time_budget_s=240,
        threads_per_trial=1,
        seed=7,
        max_rounds=MAX_ROUNDS,
        early_stopping_rounds=EARLY_STOPPING,
        space_overrides=OVERRIDES,
    )


@pytest.mark.services
def test_crashing_trials_are_reported_and_the_search_goes_on(searched: tuple) -> None:
    result, lines = searched
    assert [t.index for t in result.trials] == list(range(TRIALS))
    failed = [t for t in result.trials if t.status == tuning.ERROR]
    assert [t.index for t in failed] == [2, 5]  # the subsample=1.5 ones
    assert result.failed_trials == 2
    for trial in failed:
        assert trial.config["subsample"] == 1.5
        assert "XGBoostError" in (trial.error or "") and "exceed bound" in (trial.error or "")
        assert trial.valid_auc is None and trial.history == []
    assert all(t.error is None for t in result.trials if t.status != tuning.ERROR)
    # One progress line per trial, failures included.
    assert len(lines) == TRIALS
    assert any(line.startswith("trial 3/6: failed: XGBoostError") for line in lines)


@pytest.fixture(scope="module")
def one_at_a_time(attached: Settings, data: tuple) -> tuning.SearchResult:
    """The same search with one trial at a time: each trial starts after all lower ones ended,
    so every ASHA verdict is settled when the trial reaches the rung."""
    return _search(attached, data, concurrency=1)


@pytest.mark.services
def test_asha_stops_weak_trials_early_as_rays_asha_would_sequentially(
    searched: tuple, one_at_a_time: tuning.SearchResult, sequential: tuning.SearchResult
) -> None:
    rungs = tuning.milestones(grace_rounds=GRACE, reduction_factor=RF, max_rounds=MAX_ROUNDS)
    completed = [t for t in sequential.trials if t.status != tuning.ERROR]
    best_so_far = [list(np.maximum.accumulate(t.history)) for t in completed]
    expected = {completed[i].index: m for i, m in _ray_asha_sequential(best_so_far, rungs).items()}
    assert 1 in expected  # the weak trial right after a strong one cannot pass the first rung

    natural = {t.index: t for t in sequential.trials}
    for result in (searched[0], one_at_a_time):
        by_index = {t.index: t for t in result.trials}
        for alone in completed:
            trial = by_index[alone.index]
            # A Tune trial trains exactly the model the plain loop trains, round for round.
            assert trial.history == alone.history[: len(trial.history)]
            if alone.index in expected:
                milestone = expected[alone.index]
                assert trial.status == tuning.STOPPED
                assert trial.valid_auc == max(alone.history[:milestone])
                assert trial.rounds <= milestone
            else:
                assert trial.status == tuning.TERMINATED
                assert (trial.valid_auc, trial.rounds) == (alone.valid_auc, alone.rounds)
    # Ray really stopped them, at the rung: they reported fewer rounds than they run alone.
    # (With trials side by side a weak trial can end before a lower trial reaches the rung,
    # and so before its verdict: its result is still cut at the rung, but it ran every round.)
    for trial in one_at_a_time.trials:
        if trial.index in expected:
            assert len(trial.history) == expected[trial.index]
            assert len(trial.history) < len(natural[trial.index].history)


@pytest.mark.services
def test_best_configuration_is_the_best_completed_trial_and_refits_to_its_auc(
    searched: tuple, data: tuple
) -> None:
    result, _ = searched
    completed = [t for t in result.trials if t.status != tuning.ERROR]
    best = max(completed, key=lambda t: t.valid_auc or 0.0)
    assert result.best_valid_auc == best.valid_auc
    assert result.best_config == best.config and result.best_rounds == best.rounds
    assert "num_boost_round" not in result.best_config
    fit_x, fit_y, valid_x, valid_y = data
    booster = xgb.train(
        result.best_config,
        xgb.DMatrix(fit_x, label=fit_y, feature_names=FEATURES),
        num_boost_round=MAX_ROUNDS,
        evals=[(xgb.DMatrix(valid_x, label=valid_y, feature_names=FEATURES), "valid")],
        early_stopping_rounds=EARLY_STOPPING,
        verbose_eval=False,
    )
    assert booster.best_iteration + 1 == result.best_rounds
    assert booster.best_score == pytest.approx(result.best_valid_auc, abs=1e-12)


@pytest.mark.services
def test_same_seed_same_data_gives_the_same_outcome_even_at_another_concurrency(
    searched: tuple, one_at_a_time: tuning.SearchResult
) -> None:
    """With one trial at a time the trials report in index order; with two they race. Ray's
    ASHA could decide differently; the ordered rule may not."""
    first, again = searched[0], one_at_a_time
    assert again.best_config == first.best_config
    assert (again.best_valid_auc, again.best_rounds) == (first.best_valid_auc, first.best_rounds)
    outcome = [(t.status, t.valid_auc, t.rounds, t.config, t.error) for t in first.trials]
    assert [(t.status, t.valid_auc, t.rounds, t.config, t.error) for t in again.trials] == outcome


@pytest.mark.services
def test_search_fails_only_when_every_trial_failed(attached: Settings, data: tuple) -> None:
    with pytest.raises(RuntimeError, match=r"all 2 trials failed.*trial 1.*subsample exceed"):
        _search(attached, data, concurrency=2, trials=2, space_overrides={"subsample": 1.5})


@pytest.mark.services
def test_log_trials_writes_nested_runs_with_the_per_round_history(
    stack: Settings, searched: tuple
) -> None:
    from mlflow import MlflowClient

    result, _ = searched
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment_id = client.create_experiment(f"tuning-test-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment_id, run_name="search").info.run_id
    run_ids = tuning.log_trials(
        result, tracking_uri=stack.mlflow_uri, experiment_id=experiment_id, parent_run_id=parent
    )
    assert len(run_ids) == TRIALS
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(run.info.run_id for run in children) == sorted(run_ids)
    for run_id, trial in zip(run_ids, result.trials, strict=True):
        run = client.get_run(run_id)
        assert run.data.tags["tune.status"] == trial.status
        assert run.data.params["max_depth"] == str(trial.config["max_depth"])
        assert run.data.params["eta"] == str(trial.config["eta"])
        history = client.get_metric_history(run_id, "valid_auc")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (step, value) for step, value in enumerate(trial.history, 1)
        ]
        if trial.status == tuning.ERROR:
            assert run.info.status == "FAILED"
            assert "exceed bound" in run.data.tags["tune.error"]
            assert "best_valid_auc" not in run.data.metrics
        else:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["best_valid_auc"] == pytest.approx(trial.valid_auc)
            assert run.data.metrics["best_rounds"] == trial.rounds


def test_a_ray_head_that_is_gone_fails_at_once_naming_the_address() -> None:
    """ray.init would wait without end for a dead head; the search must fail with the cause.
    (In a fresh interpreter: this one may already be attached to the session's head.)"""
    import subprocess
    import sys

    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    code = f"from easymlops.tuning import attach_ray; attach_ray({address!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert f"the Ray head at {address} does not answer" in proc.stderr, proc.stderr[-2000:]
