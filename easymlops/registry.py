"""The one place that talks to the MLflow model registry: log and register a model, read and move
the `champion` alias, load a booster, read the metrics a promotion gate compares.

Aliases only: model-version stages are deprecated in MLflow and never used here. Read paths use an
explicit `MlflowClient(tracking_uri=...)` so a long-lived process (a Serve replica) never depends
on the process-wide MLflow URI; `log_and_register` needs MLflow's fluent run API and therefore
sets the process-wide tracking and registry URIs to `settings.mlflow_uri`.

Not dagster-mlflow: its `mlflow_tracking` resource opens one MLflow run per Dagster run and sets
the process-wide URI and experiment, while training here logs one run per tuned model with the
Dagster run id as a tag, and serving must not touch process-wide state. Its only other part, a
hook that ends the active run, has nothing to end here. So the dependency was dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from easymlops.features import FEATURE_SET_VERSION, MODEL_FEATURES
from easymlops.settings import Settings

# mlflow (3 s) and xgboost with scikit-learn (2 s) are imported inside the functions that use
# them: the Dagster code location imports this module, and every step process loads the code
# location before it runs (tests/test_definitions.py keeps them out of sys.modules).
if TYPE_CHECKING:
    import xgboost
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.entities.model_registry import RegisteredModel as RegisteredModelEntity
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

# Tag names on a model version; serving and the promotion gate read them.
FEATURE_SET_VERSION_TAG = "feature_set_version"
FEATURE_NAMES_TAG = "feature_names"
# Name of the model artifact inside its run/logged model.
MODEL_ARTIFACT_NAME = "model"


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """One version of a registered model, as much as a caller needs to load or compare it."""

    name: str
    version: str
    run_id: str
    model_uri: str  # `models:/<name>/<version>`: stable, unlike the alias URI
    feature_set_version: str | None = None

    @classmethod
    def from_model_version(cls, mv: ModelVersion) -> RegisteredModel:
        return cls(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or "",
            model_uri=f"models:/{mv.name}/{mv.version}",
            feature_set_version=(mv.tags or {}).get(FEATURE_SET_VERSION_TAG),
        )


def client(settings: Settings) -> MlflowClient:
    """A client bound to the settings' server, independent of the process-wide MLflow URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


def _signature() -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # Declared rather than inferred so that the input schema is exactly MODEL_FEATURES (in order)
    # and logging needs no sample data.
    return ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in MODEL_FEATURES]),
        outputs=Schema([ColSpec("double")]),
    )


def log_and_register(
    booster: xgboost.Booster,
    *,
    params: dict,
    metrics: dict[str, float],
    settings: Settings,
    tags: dict[str, str] | None = None,
    run_name: str | None = None,
    artifacts: Mapping[str, Any] | None = None,
    figures: Mapping[str, Any] | None = None,
) -> RegisteredModel:
    """Log `booster` with its params and metrics in a new run of `settings.mlflow_experiment` and
    register it as a new version of `settings.model_name`, tagged with the feature-set version.

    The booster must have been trained on MODEL_FEATURES in that order: serving builds its input
    by those names, so a mismatch is refused here rather than discovered at prediction time.
    The new version gets no alias; promotion is a separate, gated step (`promote`).
    `artifacts` are JSON-able objects logged as `<name>` (e.g. "calibration.json"), `figures`
    matplotlib figures logged as images.
    """
    names = tuple(booster.feature_names or ())
    if names != MODEL_FEATURES:
        raise ValueError(
            f"booster feature names {list(names)} differ from MODEL_FEATURES {list(MODEL_FEATURES)}"
        )
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"metrics must be finite numbers, got {bad}")

    import mlflow
    import mlflow.xgboost
    import xgboost

    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    mlflow.set_experiment(settings.mlflow_experiment)
    version_tags = {
        **(tags or {}),
        FEATURE_SET_VERSION_TAG: FEATURE_SET_VERSION,
        FEATURE_NAMES_TAG: ",".join(MODEL_FEATURES),
    }
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.set_tag(FEATURE_SET_VERSION_TAG, FEATURE_SET_VERSION)
        for name, value in (artifacts or {}).items():
            mlflow.log_dict(value, name)
        for name, figure in (figures or {}).items():
            mlflow.log_figure(figure, name)
        info = mlflow.xgboost.log_model(
            booster,
            name=MODEL_ARTIFACT_NAME,
            signature=_signature(),
            # Explicit requirements skip MLflow's inference, which reloads the model in a
            # subprocess (seconds per call); -cpu avoids the 470 MB NCCL wheel of `xgboost`.
            pip_requirements=[f"xgboost-cpu=={xgboost.__version__}"],
            registered_model_name=settings.model_name,
        )
        run_id = run.info.run_id
    if info.registered_model_version is None:
        raise RuntimeError(f"MLflow did not register {settings.model_name} for run {run_id}")
    version = str(info.registered_model_version)
    mlflow_client = client(settings)
    for key, value in version_tags.items():
        mlflow_client.set_model_version_tag(settings.model_name, version, key, value)
    log.info("registered %s version %s (run %s)", settings.model_name, version, run_id)
    return RegisteredModel(
        name=settings.model_name,
        version=version,
        run_id=run_id,
        model_uri=f"models:/{settings.model_name}/{version}",
        feature_set_version=FEATURE_SET_VERSION,
    )


def champion(settings: Settings) -> RegisteredModel | None:
    """The version behind `settings.champion_alias`, or None when there is no such alias yet (or
    no registered model at all): both are normal states before the first promotion."""
    return aliased(settings, settings.champion_alias)


def aliased(settings: Settings, alias: str) -> RegisteredModel | None:
    """The version behind `alias`, or None (no such alias, or no registered model yet).

    Reads the alias map of the registered model instead of `get_model_version_by_alias`, whose
    "alias not found" error is an INVALID_PARAMETER_VALUE indistinguishable from a real error.
    """
    version = aliases(settings).get(alias)
    if version is None:
        return None
    mv = client(settings).get_model_version(settings.model_name, version)
    return RegisteredModel.from_model_version(mv)


def get_version(version: str | int, settings: Settings) -> RegisteredModel:
    """One version of `settings.model_name` (raises MlflowException if it does not exist)."""
    mv = client(settings).get_model_version(settings.model_name, str(version))
    return RegisteredModel.from_model_version(mv)


def promote(
    version: str | int,
    settings: Settings,
    *,
    alias: str | None = None,
    by: str = "api",
    reason: str = "promote",
    hold: bool = False,
) -> RegisteredModel:
    """Point `alias` (default: the champion alias) at `version`, recorded in the alias history
    (`alias_history`). Serving picks a new champion up on its next poll.

    Moving the alias is the whole promotion (and rollback): no stage transition, no copy.
    `hold=True` (a move by a person: `easymlops model promote/rollback`) keeps the champion where
    it is put until a version newer than every existing one passes the gate (`champion_hold`).
    """
    target = alias or settings.champion_alias
    mlflow_client = client(settings)
    mv = mlflow_client.get_model_version(settings.model_name, str(version))
    previous = aliases(settings).get(target)
    mlflow_client.set_registered_model_alias(settings.model_name, target, str(mv.version))
    record_alias_move(
        settings,
        alias=target,
        from_version=previous,
        to_version=str(mv.version),
        by=by,
        reason=reason,
    )
    if target == settings.champion_alias:
        if hold:
            _hold_champion(settings)
        else:
            _clear_hold(settings)
    log.info("alias %s of %s -> version %s (%s)", target, settings.model_name, mv.version, by)
    return RegisteredModel.from_model_version(mv)


# -- alias history and hold ------------------------------------------------------------------------
# Every alias move is one tag on the registered model, `easymlops.alias_move.<seq>` = JSON
# {alias, from, to, by, at, reason}: MLflow keeps no history of aliases, and tags survive the
# server. seq is zero-padded so that tags sort in order.
ALIAS_MOVE_TAG = "easymlops.alias_move."
# The newest version number when a person last moved the champion: the deployment asset only
# moves the champion again for a gated version newer than this (a rollback stays in force).
HOLD_TAG = "easymlops.champion_hold"
ROLLBACK_REASON = "rollback from version"


@dataclass(frozen=True, slots=True)
class AliasMove:
    seq: int
    alias: str
    from_version: str | None
    to_version: str
    by: str
    at: str  # ISO-8601 UTC
    reason: str

    def describe(self) -> str:
        return (
            f"{self.alias}: {self.from_version or 'none'} -> {self.to_version} by {self.by} "
            f"at {self.at} ({self.reason})"
        )


def _registered(settings: Settings) -> RegisteredModelEntity | None:
    """The registered model, or None before its first version."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client(settings).get_registered_model(settings.model_name)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def _registered_tags(settings: Settings) -> dict[str, str]:
    registered = _registered(settings)
    return dict(registered.tags or {}) if registered else {}


def aliases(settings: Settings) -> dict[str, str]:
    """alias -> version of `settings.model_name` ({} when the model does not exist yet)."""
    registered = _registered(settings)
    aliases = (registered.aliases or {}) if registered else {}
    return {alias: str(version) for alias, version in aliases.items()}


def all_versions(settings: Settings) -> list[ModelVersion]:
    """Every version of `settings.model_name`, oldest first."""
    found = client(settings).search_model_versions(f"name = '{settings.model_name}'")
    return sorted(found, key=lambda mv: int(mv.version))


def alias_history(settings: Settings) -> list[AliasMove]:
    """Every recorded alias move, oldest first."""
    moves = []
    for key, value in _registered_tags(settings).items():
        if key.startswith(ALIAS_MOVE_TAG):
            data = json.loads(value)
            moves.append(
                AliasMove(
                    seq=int(key.removeprefix(ALIAS_MOVE_TAG)),
                    alias=data["alias"],
                    from_version=data.get("from"),
                    to_version=data["to"],
                    by=data.get("by", "unknown"),
                    at=data.get("at", ""),
                    reason=data.get("reason", ""),
                )
            )
    return sorted(moves, key=lambda move: move.seq)


def record_alias_move(
    settings: Settings,
    *,
    alias: str,
    from_version: str | None,
    to_version: str,
    by: str,
    reason: str,
    at: datetime | None = None,
) -> AliasMove:
    history = alias_history(settings)
    move = AliasMove(
        seq=(history[-1].seq + 1) if history else 1,
        alias=alias,
        from_version=from_version,
        to_version=to_version,
        by=by,
        at=(at or datetime.now(UTC)).isoformat(timespec="seconds"),
        reason=reason,
    )
    value = {"alias": alias, "from": from_version, "to": to_version, "by": by, "at": move.at}
    value["reason"] = reason[:1000]
    client(settings).set_registered_model_tag(
        settings.model_name, f"{ALIAS_MOVE_TAG}{move.seq:06d}", json.dumps(value)
    )
    return move


def champion_hold(settings: Settings) -> int | None:
    """Version number a gated version must exceed before the deployment moves the champion, set
    by a move by hand (None: no hold)."""
    value = _registered_tags(settings).get(HOLD_TAG)
    return int(value) if value else None


def _hold_champion(settings: Settings) -> None:
    """Hold the champion until a version newer than every existing one passes the gate."""
    newest = max(int(v.version) for v in all_versions(settings))
    client(settings).set_registered_model_tag(settings.model_name, HOLD_TAG, str(newest))


def _clear_hold(settings: Settings) -> None:
    if champion_hold(settings) is not None:
        client(settings).delete_registered_model_tag(settings.model_name, HOLD_TAG)


def rollback(settings: Settings, *, by: str) -> AliasMove:
    """Move the champion back to the version it held before its current one (by the alias
    history), and hold it there until a newer version passes the gate."""
    current = aliases(settings).get(settings.champion_alias)
    if current is None:
        raise ValueError(
            f"{settings.model_name} has no {settings.champion_alias}: nothing to roll back"
        )
    # Versions once rolled back from are skipped: a second rollback goes further back rather
    # than returning to the version just abandoned.
    moves = [m for m in alias_history(settings) if m.alias == settings.champion_alias]
    abandoned = {m.from_version for m in moves if m.reason.startswith(ROLLBACK_REASON)}
    previous = next(
        (
            version
            for m in reversed(moves)
            for version in (m.to_version, m.from_version)
            if version is not None and version != current and version not in abandoned
        ),
        None,
    )
    if previous is None:
        raise ValueError(
            f"{settings.model_name}@{settings.champion_alias} = version {current} has no earlier "
            "champion in the alias history to roll back to"
        )
    promote(previous, settings, by=by, reason=f"{ROLLBACK_REASON} {current}", hold=True)
    return alias_history(settings)[-1]


OUTSIDE = "outside easymlops (MLflow UI or API)"


def moves_since(settings: Settings, seq: int, known: Mapping[str, str]) -> list[AliasMove]:
    """Alias moves after history entry `seq`, given the aliases `known` as of that entry.

    A move made outside easymlops (the MLflow UI or API moves an alias without a history entry)
    is recorded here, `by` OUTSIDE, so that it enters the history once; a champion moved that
    way is held like a rollback (a person decided it)."""
    moves = [m for m in alias_history(settings) if m.seq > seq]
    expected = dict(known)
    for move in moves:
        expected[move.alias] = move.to_version
    for alias, version in sorted(aliases(settings).items()):
        if expected.get(alias) != version:
            hold = alias == settings.champion_alias
            move = record_alias_move(
                settings,
                alias=alias,
                from_version=expected.get(alias),
                to_version=version,
                by=OUTSIDE,
                reason="alias moved without easymlops",
            )
            if hold:
                _hold_champion(settings)
            moves.append(move)
    return moves


# The promotion gate's verdict, kept on the model version itself so that any later promotion
# (by an asset, the CLI or by hand) can refuse a version that failed or was never gated.
GATE_TAG = "easymlops.promotion_gate"


def record_gate(
    version: str | int,
    passed: bool,
    reason: str,
    settings: Settings,
    details: Mapping[str, object] | None = None,
) -> None:
    """Keep the gate's verdict and reason (and `details`, e.g. the AUCs and intervals it
    compared, as `easymlops.promotion_gate.<key>` tags) on the model version."""
    mlflow_client = client(settings)
    mlflow_client.set_model_version_tag(
        settings.model_name, str(version), GATE_TAG, "passed" if passed else "failed"
    )
    mlflow_client.set_model_version_tag(
        settings.model_name, str(version), f"{GATE_TAG}.reason", reason[:5000]
    )
    for key, value in (details or {}).items():
        mlflow_client.set_model_version_tag(
            settings.model_name, str(version), f"{GATE_TAG}.{key}", str(value)[:5000]
        )


def gate_verdict(version: str | int, settings: Settings) -> tuple[str, str]:
    """("passed" | "failed" | "not gated", reason) for `version`."""
    mv = client(settings).get_model_version(settings.model_name, str(version))
    tags = mv.tags or {}
    return tags.get(GATE_TAG, "not gated"), tags.get(f"{GATE_TAG}.reason", "")


_MODELS_URI = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[^/]+))?(?P<path>/.*)?$"
)


def download_uri(model_uri: str, settings: Settings) -> str:
    """The storage location behind a `models:/` URI, resolved on the settings' registry.

    MLflow 3 resolves `models:/` URIs with the process-wide registry URI even when
    `download_artifacts(registry_uri=...)` is given, so in a process that never called
    `mlflow.set_registry_uri` (a Serve replica) it looks in a local ./mlruns and reports the
    model as missing; resolving here keeps the read path free of global state.
    Other URIs (`runs:/`, `mlflow-artifacts:/`, paths) are returned unchanged.
    """
    match = _MODELS_URI.match(model_uri)
    if match is None:
        return model_uri
    mlflow_client = client(settings)
    name, version, alias = match["name"], match["version"], match["alias"]
    if alias is not None:
        version = mlflow_client.get_model_version_by_alias(name, alias).version
    if version is not None:
        base = mlflow_client.get_model_version_download_uri(name, str(version))
    else:  # `models:/<model_id>`: an MLflow 3 logged model, not a registered one
        base = mlflow_client.get_logged_model(name).artifact_location
    return base.rstrip("/") + (match["path"] or "")


def load_booster(model_uri: str, settings: Settings) -> xgboost.Booster:
    """Download `model_uri` (`models:/name/version`, `models:/name@alias`, `runs:/...`) from the
    settings' server and load it as a raw Booster (not a pyfunc: serving needs DMatrix
    feature-name checks and nothing of the pyfunc wrapper)."""
    import mlflow.artifacts
    import mlflow.xgboost
    import xgboost

    with tempfile.TemporaryDirectory(prefix="easymlops-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=download_uri(model_uri, settings),
            dst_path=tmp,
            tracking_uri=settings.mlflow_uri,
            registry_uri=settings.mlflow_uri,
        )
        model = mlflow.xgboost.load_model(local)
    if not isinstance(model, xgboost.Booster):
        # A model logged through the scikit-learn API loads as its wrapper; serving wants the
        # booster underneath.
        model = model.get_booster()
    return model


def version_metrics(version: str | int, settings: Settings) -> dict[str, float]:
    """Metrics of the run that produced `version`, so a promotion gate can compare a challenger
    with the champion on the numbers they were each evaluated with."""
    mlflow_client = client(settings)
    mv = mlflow_client.get_model_version(settings.model_name, str(version))
    if not mv.run_id:
        return {}
    return dict(mlflow_client.get_run(mv.run_id).data.metrics)
