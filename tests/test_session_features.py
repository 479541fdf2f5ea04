"""Online and offline session features agree: the stream's fold (easymlops.session_features, what
the validator and the Flink job keep in Redis) read the way serving reads it, against the dbt
model fct_cart_events built on the same generated events with the real dbt on DuckDB."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC
from pathlib import Path

import polars as pl
import pytest
from test_dbt import dbt_env, query, run_dbt

from easymlops.features import SESSION_FEATURES
from easymlops.generator import generate_events
from easymlops.lake import EVENT_COLUMNS
from easymlops.schema import Event, validate_record
from easymlops.session_features import SessionState, features_at

FUNNEL_RANK = {"view": 0, "cart": 1, "remove_from_cart": 2, "purchase": 3}


def order_key(event: Event) -> tuple[object, int, str]:
    """What "before" means offline (fct_cart_events.sql): time, funnel rank, event id."""
    return (event.event_time, FUNNEL_RANK[event.event_type], event.event_id)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Event]]:
    base = tmp_path_factory.mktemp("session-features")
    lake, warehouse, workdir = base / "lake", base / "warehouse.duckdb", base / "work"
    workdir.mkdir()
    events = [validate_record(e) for e in generate_events(6000, days=2, seed=77)]
    frame = pl.DataFrame(
        [
            {**e.to_json_dict(), "event_time": e.event_time.astimezone(UTC).replace(tzinfo=None)}
            for e in events
        ],
        schema=EVENT_COLUMNS,
    )
    for (day,), part in frame.group_by(pl.col("event_time").dt.date(), maintain_order=True):
        directory = lake / "silver" / "events" / f"event_date={day}"
        directory.mkdir(parents=True)
        part.write_parquet(directory / "part-0.parquet")
    env = dbt_env(lake, warehouse, workdir)
    proc, _ = run_dbt(
        # cautious: not the point-in-time test, which also reads training_set (unbuilt here)
        ["build", "--select", "+fct_cart_events", "--indirect-selection", "cautious"],
        env,
        workdir,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return warehouse, events


def test_stream_fold_equals_dbt_session_features(built: tuple[Path, list[Event]]) -> None:
    warehouse, events = built
    by_session: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_session[event.user_session].append(event)
    carts = query(warehouse, "select * from main.fct_cart_events order by event_id")
    assert len(carts) > 300
    by_id = {e.event_id: e for e in events}
    for row in carts:
        cart = by_id[row["event_id"]]
        # The stream has seen exactly the session's events that come before the cart.
        before = [e for e in by_session[cart.user_session] if order_key(e) < order_key(cart)]
        stored = SessionState.of(before).to_hash() if before else {}
        online = features_at(stored, cart.product_id, cart.event_time)
        offline = {name: float(row[name]) for name in SESSION_FEATURES}
        assert online == pytest.approx(offline), json.dumps(
            {"event_id": cart.event_id, "online": online, "offline": offline}
        )
