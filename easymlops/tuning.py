"""Hyper-parameter search of the XGBoost model: Ray Tune with ASHA early stopping, and the same
trials as a plain sequential loop (the benchmark's baseline).

Ray, XGBoost and MLflow are imported inside the functions: the Dagster code location imports
this module and must load fast.

Reproducibility. The configurations are sampled once, here, from a numpy generator seeded with
`seed` (`sample_configs`), and handed to Tune as the search algorithm's points to evaluate, in
order; the sequential baseline runs the very same list. Each trial is deterministic (fixed
xgboost seed). What is left is early stopping: Ray's ASHAScheduler decides at a rung by
comparing a trial with the trials that happened to reach that rung before it, so with
concurrent trials its decisions depend on timing, and so can the best configuration. The
scheduler used here (`_OrderedASHA`) applies ASHA's rule (stop if below the 1 - 1/rf quantile
of the rung) against the trials of lower index only, which is what ASHA decides when the trials
run one after the other (tests/test_tuning.py checks this against Ray's own ASHA bracket). A
decision that still waits for a lower trial to reach the rung is taken as soon as it can be;
meanwhile the trial runs on, possibly to its end, and its result is then cut at the rung where
it is stopped (its `history` keeps every round it reported). Outcome and best configuration are
then the same whatever the timing, unless the wall-time budget cuts the search short; the
price is some rounds trained past a rung while a verdict waits.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

METRIC = "valid_auc"  # the validation AUC of the round just trained
BEST_METRIC = "valid_auc_best"  # the best validation AUC so far: what ASHA compares
TERMINATED, ERROR, STOPPED = "TERMINATED", "ERROR", "STOPPED"
RAY_NAMESPACE = "easymlops"

# Parameters every trial gets; overriding them would break the search itself.
_RESERVED = frozenset({"objective", "eval_metric", "nthread", "seed", "num_boost_round"})


@dataclass(frozen=True)
class _Param:
    name: str
    kind: Literal["int", "uniform", "loguniform"]
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> int | float:
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "uniform":
            value = rng.uniform(self.low, self.high)
        else:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        # Six significant digits: readable in MLflow, and nothing the model can tell apart.
        return float(f"{value:.6g}")

    def describe(self) -> str:
        kind = {"int": "integer, uniform", "uniform": "uniform", "loguniform": "log-uniform"}
        low, high = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        return f"{kind[self.kind]} in [{low}, {high}]"


SPACE: tuple[_Param, ...] = (
    _Param("max_depth", "int", 2, 10),
    _Param("eta", "loguniform", 0.01, 0.3),
    _Param("min_child_weight", "loguniform", 0.5, 32.0),
    _Param("subsample", "uniform", 0.5, 1.0),
    _Param("colsample_bytree", "uniform", 0.5, 1.0),
    _Param("alpha", "loguniform", 1e-3, 10.0),  # L1
    _Param("lambda", "loguniform", 1e-2, 100.0),  # L2
)


@dataclass
class TrialResult:
    trial_id: str
    config: dict[str, Any]  # the xgboost params of the trial (sampled and fixed ones)
    status: str  # TERMINATED, ERROR or STOPPED (by ASHA, or by the wall-time budget)
    valid_auc: float | None  # best validation AUC reached (up to the stop, for STOPPED)
    rounds: int  # boosting rounds of its best iteration (best_iteration + 1)
    history: list[float]  # validation AUC of each round reported, from round 1
    error: str | None  # for a crashed trial, the error message
    index: int = 0  # position in the sampled configurations (0 = first)


@dataclass
class SearchResult:
    best_config: dict[str, Any]  # xgboost params of the best trial (no num_boost_round key)
    best_rounds: int  # rounds to refit with
    best_valid_auc: float
    trials: list[TrialResult]  # by index
    wall_seconds: float
    search_space: dict[str, str]  # what was searched, human-readable
    failed_trials: int


# ---- configurations ----------------------------------------------------------------------


def fixed_params(*, threads_per_trial: int, seed: int) -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "tree_method": "hist",
        "nthread": threads_per_trial,
        "seed": seed,
    }


def sample_configs(
    trials: int,
    *,
    seed: int,
    threads_per_trial: int,
    space_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The xgboost params of each trial, in order. An override is a value for every trial, or a
    list of values taken in turn (trial i gets values[i % len(values)]); the other parameters
    are sampled as without it, so an override changes nothing else."""
    overrides = space_overrides or {}
    reserved = _RESERVED & overrides.keys()
    if reserved:
        raise ValueError(f"space_overrides cannot set {sorted(reserved)}")
    for name, value in overrides.items():
        if isinstance(value, list | tuple) and not value:
            raise ValueError(f"space_overrides[{name!r}] is an empty list")
    rng = np.random.default_rng(seed)
    configs = []
    for index in range(trials):
        sampled: dict[str, Any] = {param.name: param.sample(rng) for param in SPACE}
        for name, value in overrides.items():
            sampled[name] = value[index % len(value)] if isinstance(value, list | tuple) else value
        configs.append(fixed_params(threads_per_trial=threads_per_trial, seed=seed) | sampled)
    return configs


def describe_space(
    *, max_rounds: int, early_stopping_rounds: int, space_overrides: dict[str, Any] | None = None
) -> dict[str, str]:
    described = {param.name: param.describe() for param in SPACE}
    for name, value in (space_overrides or {}).items():
        if isinstance(value, list | tuple):
            described[name] = "in turn: " + ", ".join(map(str, value))
        else:
            described[name] = f"fixed: {value}"
    described["num_boost_round"] = (
        f"early stopping on validation AUC ({early_stopping_rounds} rounds), at most {max_rounds}"
    )
    return described


# ---- outcome of a trial ------------------------------------------------------------------


def _best(history: Sequence[float]) -> tuple[float | None, int]:
    """Best AUC and its number of rounds; the first of equal bests, like xgboost's early
    stopping (it counts only strict improvements)."""
    if not history:
        return None, 0
    values = np.asarray(history, dtype=float)
    if np.all(np.isnan(values)):
        return float("nan"), 1
    at = int(np.nanargmax(values))
    return float(values[at]), at + 1


def _ended_naturally(history: Sequence[float], *, max_rounds: int, early_stopping: int) -> bool:
    """Whether xgboost itself ended the training: all rounds, or `early_stopping` rounds
    without improvement after the best."""
    _, rounds = _best(history)
    return len(history) >= max_rounds or len(history) - rounds >= early_stopping


def _trial_result(
    index: int,
    trial_id: str,
    config: dict[str, Any],
    history: list[float],
    *,
    error: str | None,
    stopped_at: int | None,
    max_rounds: int,
    early_stopping: int,
) -> TrialResult:
    if error is not None:
        status = ERROR
        scored = history
    elif stopped_at is not None:
        status, scored = STOPPED, history[:stopped_at]
    else:
        natural = _ended_naturally(history, max_rounds=max_rounds, early_stopping=early_stopping)
        status, scored = (TERMINATED if natural else STOPPED), history
    auc, rounds = _best(scored)
    return TrialResult(
        trial_id=trial_id,
        config=config,
        status=status,
        valid_auc=auc,
        rounds=rounds,
        history=list(history),
        error=error,
        index=index,
    )


def _progress_line(result: TrialResult, total: int) -> str:
    head = f"trial {result.index + 1}/{total}"
    if result.status == ERROR:
        first_line = (result.error or "").strip().splitlines()[:1]
        return f"{head}: failed: {''.join(first_line)} ({ERROR})"
    return f"{head}: auc {result.valid_auc:.4f} after {result.rounds} rounds ({result.status})"


def _summarize(
    trials: list[TrialResult], *, wall_seconds: float, search_space: dict[str, str]
) -> SearchResult:
    if not trials:
        raise RuntimeError("no trial ran (is the wall-time budget too small?)")
    scored = [t for t in trials if t.status != ERROR and t.valid_auc is not None]
    scored = [t for t in scored if not math.isnan(t.valid_auc or math.nan)]
    if not scored:
        first = min(trials, key=lambda t: t.index)
        raise RuntimeError(
            f"all {len(trials)} trials failed; the first (trial {first.index + 1}): "
            f"{first.error or 'no validation AUC'}"
        )
    # Highest AUC, then the lowest index: a total order, so ties cannot make it vary.
    best = min(scored, key=lambda t: (-(t.valid_auc or 0.0), t.index))
    return SearchResult(
        best_config=dict(best.config),
        best_rounds=best.rounds,
        best_valid_auc=float(best.valid_auc or 0.0),
        trials=sorted(trials, key=lambda t: t.index),
        wall_seconds=wall_seconds,
        search_space=search_space,
        failed_trials=sum(t.status == ERROR for t in trials),
    )


def _error_message(error: BaseException | None) -> str:
    """The root error of a trial (a RayTaskError wraps the trainable's exception)."""
    if error is None:
        return "unknown error"
    cause = getattr(error, "cause", None)
    root = cause if isinstance(cause, BaseException) else error
    text = str(root).strip()
    if root is error:  # a traceback text: its last line names the error
        text = text.splitlines()[-1] if text else ""
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _validate(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    feature_names: Sequence[str],
    trials: int,
) -> None:
    if trials < 1:
        raise ValueError("trials must be at least 1")
    if fit_x.shape[1] != len(feature_names) or valid_x.shape[1] != len(feature_names):
        raise ValueError(
            f"{len(feature_names)} feature names for {fit_x.shape[1]} fit / "
            f"{valid_x.shape[1]} validation columns"
        )
    for name, y in (("fit", fit_y), ("validation", valid_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"the {name} labels have a single class: AUC is undefined")


# ---- ordered ASHA ------------------------------------------------------------------------

_PASS, _STOP, _ABSENT, _OPEN = "pass", "stop", "absent", "open"


def milestones(*, grace_rounds: int, reduction_factor: float, max_rounds: int) -> tuple[int, ...]:
    """Rounds at which ASHA compares trials: grace * rf^k, below max_rounds (as Ray's ASHA)."""
    if grace_rounds < 1 or reduction_factor <= 1:
        raise ValueError("grace_rounds must be >= 1 and reduction_factor > 1")
    rungs: list[int] = []
    milestone = float(grace_rounds)
    while round(milestone) < max_rounds:
        if not rungs or round(milestone) > rungs[-1]:
            rungs.append(round(milestone))
        milestone *= reduction_factor
    return tuple(rungs)


class _Rungs:
    """ASHA's rule with the trials in index order: trial i stops at a rung if its metric there
    is below the (1 - 1/rf) quantile of the lower trials that reached the rung (including those
    stopped there, as Ray's ASHA records them). Undetermined while a lower trial that is still
    running has not reached the rung."""

    def __init__(self, rungs: tuple[int, ...], reduction_factor: float) -> None:
        self.rungs = rungs
        self.quantile = (1 - 1 / reduction_factor) * 100
        self.values: dict[int, dict[int, float]] = {}  # index -> {milestone: metric}
        self.finished: set[int] = set()
        self._stops: dict[int, int | None] = {}  # index -> stop milestone, None: never
        self._final_rows: list[list[str]] = []  # the state at each rung of trials 0, 1, ...
        self._dirty = True

    def add(self, index: int) -> None:
        self.values.setdefault(index, {})

    def record(self, index: int, iteration: int, value: float) -> None:
        recorded = self.values.setdefault(index, {})
        if iteration in self.rungs and iteration not in recorded:
            recorded[iteration] = value
            self._dirty = True

    def finish(self, index: int) -> None:
        self.add(index)
        if index not in self.finished:
            self.finished.add(index)
            self._dirty = True

    def stops(self) -> dict[int, int | None]:
        """Settled trials: index -> milestone where it is stopped, or None (never stopped)."""
        if self._dirty:
            self._stops = self._settle()
            self._dirty = False
        return self._stops

    def _settle(self) -> dict[int, int | None]:
        # A row without an open rung never changes again: the leading such rows are kept, so a
        # long search does not recompute its finished trials on every event.
        states: dict[int, list[str]] = dict(enumerate(self._final_rows))
        for index in range(len(self._final_rows), max(self.values, default=-1) + 1):
            values = self.values.get(index)
            row: list[str] = []
            for r, milestone in enumerate(self.rungs):
                before = row[r - 1] if r else _PASS
                if before in (_STOP, _ABSENT):
                    state = _ABSENT
                elif before == _OPEN or values is None:
                    state = _OPEN
                elif milestone not in values:
                    state = _ABSENT if index in self.finished else _OPEN
                else:
                    lower = [states[j][r] for j in range(index)]
                    if _OPEN in lower:
                        state = _OPEN
                    else:
                        reached = [
                            self.values[j][milestone]
                            for j in range(index)
                            if states[j][r] in (_PASS, _STOP)
                        ]
                        cutoff = np.nanpercentile(reached, self.quantile) if reached else None
                        below = cutoff is not None and values[milestone] < cutoff
                        state = _STOP if below else _PASS
                row.append(state)
            states[index] = row
            if index == len(self._final_rows) and _OPEN not in row:
                self._final_rows.append(row)
        settled: dict[int, int | None] = {}
        for index, row in states.items():
            if _STOP in row:
                settled[index] = self.rungs[row.index(_STOP)]
            elif _OPEN not in row and (index in self.finished or not self.rungs):
                settled[index] = None
        return settled


def _ordered_asha(rungs: _Rungs) -> Any:
    """A Tune scheduler that stops the trials `rungs` settles as stopped (at their next
    result), and otherwise runs trials first in, first out."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class _OrderedASHA(FIFOScheduler):  # type: ignore[misc]
        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            rungs.add(int(trial.config["index"]))

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            index = int(trial.config["index"])
            if BEST_METRIC in result and "training_iteration" in result:
                rungs.record(index, int(result["training_iteration"]), float(result[BEST_METRIC]))
            if rungs.stops().get(index) is not None:
                return str(TrialScheduler.STOP)
            return str(TrialScheduler.CONTINUE)

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            rungs.finish(int(trial.config["index"]))

        def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
            rungs.finish(int(trial.config["index"]))

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            rungs.finish(int(trial.config["index"]))

        def debug_string(self) -> str:
            return f"OrderedASHA: rungs {rungs.rungs}, stopped {rungs.stops()}"

    return _OrderedASHA()


# ---- Tune --------------------------------------------------------------------------------


@dataclass
class _Recorder:
    """What the driver hears from the trials: their rounds, errors and ends."""

    configs: list[dict[str, Any]]
    rungs: _Rungs
    max_rounds: int
    early_stopping: int
    progress: Callable[[str], None] | None
    histories: dict[int, dict[int, float]] = field(default_factory=dict)
    trial_ids: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    announced: set[int] = field(default_factory=set)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks (and so this) into its experiment state; a progress
        # function such as Dagster's context.log.info holds a logger, which cannot be pickled.
        # Only the live recorder in the driver reports progress.
        return {**self.__dict__, "progress": None}

    def result(self, index: int, trial_id: str, result: dict) -> None:
        self.trial_ids[index] = trial_id
        if METRIC in result and "training_iteration" in result:
            self.histories.setdefault(index, {})[int(result["training_iteration"])] = float(
                result[METRIC]
            )

    def end(self, index: int, trial_id: str, error: str | None = None) -> None:
        self.trial_ids[index] = trial_id
        self.ended.add(index)
        if error is not None:
            self.errors[index] = error
        self.announce()

    def outcome(self, index: int, stopped_at: int | None) -> TrialResult:
        rounds = self.histories.get(index, {})
        return _trial_result(
            index,
            self.trial_ids.get(index, str(index)),
            self.configs[index],
            [rounds[r] for r in sorted(rounds)],
            error=self.errors.get(index),
            stopped_at=stopped_at,
            max_rounds=self.max_rounds,
            early_stopping=self.early_stopping,
        )

    def announce(self, stops: dict[int, int | None] | None = None) -> None:
        """One progress line per ended trial, once its outcome is settled."""
        if self.progress is None:
            return
        stops = self.rungs.stops() if stops is None else stops
        for index in sorted(self.ended - self.announced):
            if index in stops or index in self.errors:
                self.announced.add(index)
                self.progress(
                    _progress_line(self.outcome(index, stops.get(index)), len(self.configs))
                )


def _trial_error(trial: Any) -> str:
    """The error of a failed Tune trial, from the files Tune has just written beside the trial
    (the copy in the storage path appears only when Tune syncs)."""
    import ray.cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.exists(pickled):
        with open(pickled, "rb") as file:
            return _error_message(ray.cloudpickle.load(file))
    if text and os.path.exists(text):
        with open(text) as file:
            return _error_message(RuntimeError(file.read()))
    return "unknown error (Tune recorded none)"


def _tune_callback(recorder: _Recorder) -> Any:
    from ray.tune import Callback

    class _Record(Callback):  # type: ignore[misc]
        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            recorder.result(int(trial.config["index"]), trial.trial_id, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            recorder.end(int(trial.config["index"]), trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            recorder.end(int(trial.config["index"]), trial.trial_id, _trial_error(trial))

    return _Record()


def _train_trial(
    config: dict[str, Any],
    *,
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    feature_names: list[str],
    max_rounds: int,
    early_stopping_rounds: int,
) -> None:
    """One Tune trial: xgboost with early stopping, reporting every round to Tune."""
    import xgboost as xgb
    from ray.tune.integration.xgboost import TuneReportCheckpointCallback

    params = dict(config["params"])
    threads = int(params["nthread"])
    fit = xgb.DMatrix(fit_x, label=fit_y, feature_names=feature_names, nthread=threads)
    valid = xgb.DMatrix(valid_x, label=valid_y, feature_names=feature_names, nthread=threads)
    best = [-math.inf]

    def with_best(report: dict[str, float | list[float]]) -> dict[str, float]:
        auc = float(report[METRIC])  # type: ignore[arg-type]  # one eval set: a float
        best[0] = max(best[0], auc)
        return {METRIC: auc, BEST_METRIC: best[0]}

    report = TuneReportCheckpointCallback(
        metrics={METRIC: "valid-auc"},
        frequency=0,
        # No model is kept: the caller refits the best configuration.
        checkpoint_at_end=False,
        results_postprocessing_fn=with_best,
    )
    xgb.train(
        params,
        fit,
        num_boost_round=max_rounds,
        evals=[(valid, "valid")],
        early_stopping_rounds=early_stopping_rounds,
        verbose_eval=False,
        callbacks=[report],
    )


# Read by Tune when a fit starts: its newer console output prints the experiment path even at
# verbose=0 (the older reporter is silent), and it adds CSV and TensorBoard loggers by default.
# A failed trial's traceback is logged too, unless told not to: the error is in the result and
# the progress line instead.
_TUNE_ENVIRONMENT = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
}


@contextlib.contextmanager
def _tune_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in _TUNE_ENVIRONMENT}
    os.environ.update(_TUNE_ENVIRONMENT)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def attach_ray(ray_address: str | None) -> bool:
    """Join the Ray cluster at `ray_address` (or reuse this process's Ray); without an address
    start a local instance. Returns whether this call initialized Ray in this process, in which
    case the caller should `ray.shutdown()` when done: a driver left attached to a head that
    later stops is terminated by Ray (GCS unreachable for 60 s), whatever it is doing then."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    # Under `uv run`, Ray would otherwise ship the working directory and build a virtualenv per
    # code snapshot for the workers (see serving.deploy.connect).
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if ray_address is None:
        # A private single-node instance on loopback, like the embedded head.
        ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray 2.60 turns token auth on for a new local instance and writes ~/.ray/auth_token;
        # every later `ray start` on the machine (the embedded head) then picks the token up and
        # its dashboard answers 401 to the stack's health check. The embedded head runs without
        # tokens, on loopback; so does this instance. An explicit RAY_AUTH_MODE is respected.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            namespace=RAY_NAMESPACE,
        )
        return True
    host, port = ray_address.rsplit(":", 1)
    # ray.init waits without end for a head whose GCS is gone; say so at once instead.
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise RuntimeError(
            f"the Ray head at {ray_address} does not answer ({exc}): start the stack with "
            "`easymlops up` (`easymlops status` shows what runs)"
        ) from None
    if host in ("127.0.0.1", "localhost"):
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address=ray_address, namespace=RAY_NAMESPACE, ignore_reinit_error=True, log_to_driver=False
    )
    return True


def search(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    *,
    feature_names: Sequence[str],
    trials: int,
    time_budget_s: float,
    concurrency: int,
    threads_per_trial: int,
    seed: int,
    max_rounds: int = 400,
    early_stopping_rounds: int = 30,
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
    space_overrides: dict[str, Any] | None = None,
    grace_rounds: int = 10,
    reduction_factor: float = 3.0,
) -> SearchResult:
    """Search the xgboost parameters with Ray Tune: `trials` sampled configurations,
    `concurrency` at a time with `threads_per_trial` cores each, ASHA stopping the weak ones at
    rounds grace * rf^k, within `time_budget_s` of wall time. A crashing trial is reported
    (status ERROR) and the search goes on; it fails only if every trial failed.

    Ray: a Ray already initialized in this process is used and left as it is; otherwise the
    search attaches to `ray_address` (or starts a local instance without it) and detaches at
    the end. `wall_seconds` is the time of the search itself (Tune's fit), not of attaching."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    _validate(fit_x, fit_y, valid_x, valid_y, feature_names, trials)
    configs = sample_configs(
        trials, seed=seed, threads_per_trial=threads_per_trial, space_overrides=space_overrides
    )
    space = describe_space(
        max_rounds=max_rounds,
        early_stopping_rounds=early_stopping_rounds,
        space_overrides=space_overrides,
    )
    rungs = _Rungs(
        milestones(
            grace_rounds=grace_rounds, reduction_factor=reduction_factor, max_rounds=max_rounds
        ),
        reduction_factor,
    )
    recorder = _Recorder(
        configs=configs,
        rungs=rungs,
        max_rounds=max_rounds,
        early_stopping=early_stopping_rounds,
        progress=progress,
    )
    initialized_ray = attach_ray(ray_address)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(
                _train_trial,
                fit_x=np.ascontiguousarray(fit_x, dtype=np.float32),
                fit_y=np.asarray(fit_y),
                valid_x=np.ascontiguousarray(valid_x, dtype=np.float32),
                valid_y=np.asarray(valid_y),
                feature_names=list(feature_names),
                max_rounds=max_rounds,
                early_stopping_rounds=early_stopping_rounds,
            ),
            {"cpu": threads_per_trial},
        )
        # The space is declared for Tune's records; every trial is one of the points, in order.
        param_space = {
            "index": tune.randint(0, trials),
            "params": _tune_space(configs[0], space_overrides or {}),
        }
        points = [{"index": i, "params": config} for i, config in enumerate(configs)]
        with tempfile.TemporaryDirectory(prefix="easymlops-tune-") as storage:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=BEST_METRIC,
                    mode="max",
                    num_samples=trials,
                    # Its own max_concurrent: Tune ignores max_concurrent_trials for it.
                    search_alg=tune.search.BasicVariantGenerator(
                        points_to_evaluate=points, max_concurrent=concurrency, random_state=seed
                    ),
                    scheduler=_ordered_asha(rungs),
                    # A new actor per trial costs seconds (process start, imports); trials
                    # of a few hundred milliseconds would mostly wait for their actor.
                    reuse_actors=True,
                    time_budget_s=time_budget_s,
                ),
                run_config=tune.RunConfig(
                    name=f"xgboost-{uuid.uuid4().hex[:8]}",
                    storage_path=storage,
                    verbose=0,
                    # Only the JSON log: Tune's result grid reads it; the CSV and TensorBoard
                    # logs would cost every round a write for files nobody reads.
                    callbacks=[_tune_callback(recorder), JsonLoggerCallback()],
                ),
            )
            started = time.monotonic()
            with _tune_environment():
                tuner.fit()
            wall = time.monotonic() - started
    finally:
        if initialized_ray:
            import ray

            ray.shutdown()
    ran = sorted(recorder.trial_ids)
    # Every trial has ended now, so the rule settles each one, from the recorded rounds alone.
    final = _Rungs(rungs.rungs, reduction_factor)
    for index in ran:
        final.add(index)
        history = recorder.histories.get(index, {})
        for milestone in final.rungs:
            if milestone in history:
                final.record(index, milestone, max(history[r] for r in history if r <= milestone))
        final.finish(index)
    stops = final.stops()
    recorder.ended.update(ran)
    recorder.announce(stops)
    return _summarize(
        [recorder.outcome(index, stops.get(index)) for index in ran],
        wall_seconds=wall,
        search_space=space,
    )


def _tune_space(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The search space in Tune's terms (it accepts only points whose keys it declares)."""
    from ray import tune

    space: dict[str, Any] = dict(config)
    for param in SPACE:
        if param.kind == "int":
            space[param.name] = tune.randint(int(param.low), int(param.high) + 1)
        elif param.kind == "uniform":
            space[param.name] = tune.uniform(param.low, param.high)
        else:
            space[param.name] = tune.loguniform(param.low, param.high)
    for name, value in overrides.items():
        space[name] = tune.choice(list(value)) if isinstance(value, list | tuple) else value
    return space


# ---- sequential baseline -----------------------------------------------------------------


def sequential_search(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    *,
    feature_names: Sequence[str],
    trials: int,
    time_budget_s: float,
    threads_per_trial: int,
    seed: int,
    max_rounds: int = 400,
    early_stopping_rounds: int = 30,
    progress: Callable[[str], None] | None = None,
    space_overrides: dict[str, Any] | None = None,
) -> SearchResult:
    """The same configurations as `search`, one after the other with plain xgb.train and early
    stopping, no Ray and no ASHA. A trial still running when the budget is spent is cut there
    (STOPPED); the ones after it do not run."""
    import xgboost as xgb

    _validate(fit_x, fit_y, valid_x, valid_y, feature_names, trials)
    configs = sample_configs(
        trials, seed=seed, threads_per_trial=threads_per_trial, space_overrides=space_overrides
    )
    space = describe_space(
        max_rounds=max_rounds,
        early_stopping_rounds=early_stopping_rounds,
        space_overrides=space_overrides,
    )
    started = time.monotonic()
    deadline = started + time_budget_s

    class _Deadline(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            return time.monotonic() >= deadline

    results: list[TrialResult] = []
    for index, params in enumerate(configs):
        if time.monotonic() >= deadline:
            break
        fit = xgb.DMatrix(
            fit_x, label=fit_y, feature_names=list(feature_names), nthread=threads_per_trial
        )
        valid = xgb.DMatrix(
            valid_x, label=valid_y, feature_names=list(feature_names), nthread=threads_per_trial
        )
        evals_log: dict[str, Any] = {}
        error = None
        try:
            xgb.train(
                params,
                fit,
                num_boost_round=max_rounds,
                evals=[(valid, "valid")],
                evals_result=evals_log,
                early_stopping_rounds=early_stopping_rounds,
                verbose_eval=False,
                callbacks=[_Deadline()],
            )
        except xgb.core.XGBoostError as exc:
            error = _error_message(exc)
        history = [float(v) for v in evals_log.get("valid", {}).get("auc", [])]
        result = _trial_result(
            index,
            f"sequential_{index:05d}",
            params,
            history,
            error=error,
            stopped_at=None,
            max_rounds=max_rounds,
            early_stopping=early_stopping_rounds,
        )
        results.append(result)
        if progress is not None:
            progress(_progress_line(result, trials))
    return _summarize(results, wall_seconds=time.monotonic() - started, search_space=space)


# ---- MLflow ------------------------------------------------------------------------------


def log_trials(
    result: SearchResult, *, tracking_uri: str, experiment_id: str, parent_run_id: str
) -> list[str]:
    """One nested MLflow run per trial under `parent_run_id`: its params, best validation AUC
    and rounds, status (and error) as tags, and the validation AUC of every round as the metric
    `valid_auc` (step = round). Returns the nested run ids, in trial order."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    run_ids = []
    for trial in result.trials:
        tags = {
            "mlflow.parentRunId": parent_run_id,
            "tune.trial_id": trial.trial_id,
            "tune.trial_index": str(trial.index),
            "tune.status": trial.status,
        }
        if trial.error is not None:
            tags["tune.error"] = trial.error[:5000]
        run = client.create_run(experiment_id, run_name=f"trial-{trial.index + 1:03d}", tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(METRIC, value, now, step) for step, value in enumerate(trial.history, 1)]
        if trial.valid_auc is not None:
            metrics.append(Metric("best_valid_auc", trial.valid_auc, now, 0))
            metrics.append(Metric("best_rounds", float(trial.rounds), now, 0))
        params = [Param(key, str(value)) for key, value in sorted(trial.config.items())]
        # MLflow takes at most 100 params and 1000 metrics per batch.
        for start in range(0, max(len(params), 1), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.set_terminated(run_id, status="FAILED" if trial.status == ERROR else "FINISHED")
        run_ids.append(run_id)
    return run_ids
