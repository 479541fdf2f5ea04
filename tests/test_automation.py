"""The schedules' run requests and selections, and run-failure alerts posted to a webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from easymlops.settings import get_settings
from easymlops_assets.definitions import defs
from easymlops_assets.defs.automation.schedules import (
    RANGE_END_TAG,
    daily_refresh_schedule,
    retrain_schedule,
    retraining_window,
)
from easymlops_assets.resources import PlatformConfig

RANGE_START_TAG = "dagster/asset_partition_range_start"


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EASYMLOPS_HOME", str(tmp_path))  # an empty lake: bronze holds nothing
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_retraining_window() -> None:
    today, start = date(2026, 12, 1), date(2019, 10, 1)
    bronze = (date(2026, 11, 24), date(2026, 11, 30))
    # First run: every date bronze holds, through today.
    assert retraining_window(None, bronze, today, start) == (date(2026, 11, 24), today)
    # Later: from the last day the previous run covered (it was partial then).
    assert retraining_window(date(2026, 11, 27), bronze, today, start) == (
        date(2026, 11, 27),
        today,
    )
    # Nothing landed yet: today alone; never before the first partition.
    assert retraining_window(None, None, today, start) == (today, today)
    assert retraining_window(date(2019, 1, 1), None, today, start) == (start, today)


def _selection(job_name: str) -> set[str]:
    job = defs().resolve_job_def(job_name)
    return {key.to_user_string() for key in job.asset_layer.executable_asset_keys}


def evaluate(
    schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance, when: datetime
) -> dg.RunRequest | dg.SkipReason | None:
    """A tick of `schedule` with the platform resource; in a `with` block, which closes the
    resources again (else the test instance's storage outlives it, for later definition loads)."""
    resources = {"platform": PlatformConfig()}
    with dg.build_schedule_context(
        instance, scheduled_execution_time=when, resources=resources
    ) as c:
        return schedule(c)  # type: ignore[return-value]


def test_retrain_schedule_requests_the_whole_loop(isolated_home: None) -> None:
    @dg.op
    def noop() -> None:
        pass

    @dg.job
    def earlier() -> None:
        noop()

    when = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        first = evaluate(retrain_schedule, instance, when)
        assert isinstance(first, dg.RunRequest)
        assert (first.tags[RANGE_START_TAG], first.tags[RANGE_END_TAG]) == ("2026-12-07",) * 2
        # A successful retraining that covered up to 2026-11-30 moves the window's start there.
        earlier.execute_in_process(
            instance=instance,
            tags={"dagster/schedule_name": "retrain_schedule", RANGE_END_TAG: "2026-11-30"},
        )
        later = evaluate(retrain_schedule, instance, when)
    assert isinstance(later, dg.RunRequest)
    assert (later.tags[RANGE_START_TAG], later.tags[RANGE_END_TAG]) == ("2026-11-30", "2026-12-07")
    assert later.run_key == "retrain:2026-12-07"
    assert retrain_schedule.job_name == "full_pipeline"
    assert retrain_schedule.cron_schedule == "0 3 * * 1"  # weekly by default
    assert retrain_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    selected = _selection("full_pipeline")
    for asset in ("bronze_events", "silver_events", "fct_cart_events", "training_set"):
        assert asset in selected
    for asset in ("online_features", "purchase_model", "serving_deployment"):
        assert asset in selected


def test_daily_refresh_schedule_requests_yesterday_and_today(isolated_home: None) -> None:
    when = datetime(2026, 12, 2, 0, 30, tzinfo=UTC)
    request = daily_refresh_schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert isinstance(request, dg.RunRequest)
    assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == (
        "2026-12-01",
        "2026-12-02",
    )
    selected = _selection("daily_refresh")
    assert {"bronze_events", "silver_events", "training_set", "online_features"} <= selected
    assert not {"purchase_model", "serving_deployment"} & selected  # no retraining daily


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_failed_blocking_check_alerts_the_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    from easymlops_assets.defs.automation.sensors import alert_on_run_failure

    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("EASYMLOPS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    get_settings.cache_clear()

    @dg.asset
    def scores() -> int:
        return 1

    @dg.asset_check(asset=scores, blocking=True)
    def scores_are_sane() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, description="planted failure")

    @dg.asset(deps=[scores])
    def downstream() -> int:
        return 2

    try:
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize(
                [scores, downstream, scores_are_sane], instance=instance, raise_on_error=False
            )
            assert not result.success
            failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
            context = dg.build_run_status_sensor_context(
                sensor_name="alert_on_run_failure",
                dagster_instance=instance,
                dagster_run=result.dagster_run,
                dagster_event=failure,
            ).for_run_failure()
            alert_on_run_failure(context, platform=PlatformConfig())
    finally:
        server.shutdown()
        get_settings.cache_clear()
    assert len(_Receiver.received) == 1
    details = _Receiver.received[0]["details"]
    assert details["run_id"] == result.run_id
    assert details["failed_checks"] == "scores:scores_are_sane (ERROR)"
    assert "scores_are_sane" in _Receiver.received[0]["text"]
