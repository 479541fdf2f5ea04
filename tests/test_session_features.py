"""Online and offline session features agree: every session streamed WHOLE into the real Redis
through the stream's writer (the scored carts themselves and what follows them, purchases
included), then read the way serving reads it for each cart at its event_time, against the dbt
model fct_cart_events built on the same events with the real dbt on DuckDB.

The generated events get same-instant ties added (a view, a second cart, a remove and a purchase
at a cart's very microsecond), where only the offline order (time, funnel rank, event id) tells
what comes before the cart."""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import write_silver_events
from test_dbt import dbt_env, query, run_dbt

from easymlops.features import SESSION_FEATURES, session_key
from easymlops.generator import generate_events
from easymlops.schema import Event, validate_record
from easymlops.session_features import FUNNEL_RANK, SessionFeatureWriter, event_field
from easymlops.settings import Settings
from serving.features import session_features

pytestmark = pytest.mark.services


def order_key(event: Event) -> tuple[datetime, int, str]:
    """What "before" means offline (fct_cart_events.sql): time, funnel rank, event id."""
    return (event.event_time, FUNNEL_RANK[event.event_type], event.event_id)


def with_ties(events: list[Event]) -> list[Event]:
    """The events plus same-instant neighbours of some carts, and a session that a cart opens
    with a purchase at the same instant."""
    carts = sorted((e for e in events if e.event_type == "cart"), key=lambda e: e.event_id)
    added: list[Event] = []

    def twin(cart: Event, suffix: str, event_type: str, **changes: Any) -> Event:
        return replace(cart, event_id=cart.event_id + suffix, event_type=event_type, **changes)

    for i, cart in enumerate(carts[:120]):
        kind = i % 4
        if kind == 0:  # a view of the product at the cart's instant: before the cart
            added.append(twin(cart, "-v", "view"))
        elif kind == 1:  # the purchase at the cart's instant: after it (label 1)
            added.append(twin(cart, "-p", "purchase"))
        elif kind == 2:  # two more carts at the same instant, one id before, one after it
            added += [
                replace(twin(cart, "", "cart"), event_id="!" + cart.event_id),
                twin(cart, "~", "cart"),
                twin(cart, "-p", "purchase"),
            ]
        else:  # a remove (after the cart) and a view of another product (before it)
            added += [
                twin(cart, "-r", "remove_from_cart"),
                twin(cart, "-v", "view", product_id=cart.product_id + 1),
            ]
    opener = replace(carts[0], event_id="opener-cart", user_session="opened-by-a-cart")
    added += [opener, replace(opener, event_id="opener-buy", event_type="purchase")]
    return events + added


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Event]]:
    base = tmp_path_factory.mktemp("session-features")
    lake, warehouse, workdir = base / "lake", base / "warehouse.duckdb", base / "work"
    workdir.mkdir()
    events = with_ties([validate_record(e) for e in generate_events(6000, days=2, seed=77)])
    assert len({e.event_id for e in events}) == len(events)
    write_silver_events(lake, events)
    env = dbt_env(lake, warehouse, workdir)
    # cautious: only the tests whose every parent is built here (not the training-set audits)
    proc, _ = run_dbt(
        ["build", "--select", "+fct_cart_events", "--indirect-selection", "cautious"], env, workdir
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return warehouse, events


@dataclass
class Online:
    sessions: dict[str, dict[str, str]]  # user_session -> its hash as serving reads it
    events: list[Event]


@pytest.fixture(scope="module")
def online(built: tuple[Path, list[Event]], stack: Settings) -> Iterator[Online]:
    """Every event streamed into Redis by the validator's writer, in shuffled chunks (the order
    a partitioned topic may deliver them in) with a replayed stretch, under session names of
    this run."""
    _, events = built
    run = uuid.uuid4().hex[:8]
    streamed = [replace(e, user_session=f"{run}-{e.user_session}") for e in events]
    rng = random.Random(77)
    rng.shuffle(streamed)
    client = redis.Redis.from_url(stack.redis, decode_responses=True)
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    chunks = [streamed[lo : lo + 1000] for lo in range(0, len(streamed), 1000)]
    written = sum(writer.apply(chunk) for chunk in chunks + chunks[:2])
    assert written == len(events)
    names = sorted({e.user_session for e in events})
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(session_key(f"{run}-{name}"))
    sessions = dict(zip(names, pipe.execute(), strict=True))
    try:
        yield Online(sessions, events)
    finally:
        client.delete(*(session_key(f"{run}-{name}") for name in names))
        client.close()


def mismatches(online: dict[str, float], offline: dict[str, float]) -> list[str]:
    """Feature names whose values differ: counts exactly, seconds within 1e-9."""
    return [
        name
        for name in SESSION_FEATURES
        if (
            abs(online[name] - offline[name]) > 1e-9
            if name == "session_seconds"
            else online[name] != offline[name]
        )
    ]


def test_served_session_features_equal_dbt_with_the_whole_session_stored(
    built: tuple[Path, list[Event]], online: Online
) -> None:
    warehouse, events = built
    by_id = {e.event_id: e for e in events}
    by_session: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_session[event.user_session].append(event)
    carts = query(warehouse, "select * from main.fct_cart_events order by event_id")
    assert len(carts) > 300
    assert len(carts) == sum(e.event_type == "cart" for e in events)

    failures: list[dict[str, Any]] = []
    ties = 0
    for row in carts:
        cart = by_id[row["event_id"]]
        stored = online.sessions[cart.user_session]
        # The store holds the cart itself and what follows it: only the filter keeps them out.
        session = by_session[cart.user_session]
        assert stored == dict(map(event_field, session))
        ties += any(e.event_time == cart.event_time and e is not cart for e in session)
        offline = {name: float(row[name]) for name in SESSION_FEATURES}

        served = session_features(stored, cart.product_id, cart.event_time, cart.event_id)
        if bad := mismatches(served, offline):
            failures.append({"event_id": cart.event_id, "with_id": bad, "online": served})

        # Without the event id, a cart at the same instant is not counted (its order against
        # this cart is unknown); everything else is as offline.
        peers = [
            e
            for e in session
            if e.event_type == "cart"
            and e.event_time == cart.event_time
            and e.event_id != cart.event_id
        ]
        earlier_peers = sum(e.event_id < cart.event_id for e in peers)
        expected = offline | {
            "session_events": offline["session_events"] - earlier_peers,
            "session_carts": offline["session_carts"] - earlier_peers,
        }
        served = session_features(stored, cart.product_id, cart.event_time)
        if bad := mismatches(served, expected):
            failures.append({"event_id": cart.event_id, "without_id": bad, "online": served})

    assert not failures, json.dumps(failures[:5], indent=1) + f"\n{len(failures)} failures"
    assert ties >= 100, "the same-instant ties were not built"
    # Many carts have their purchase stored beside them: counting it would show at once.
    assert sum(row["label"] for row in carts) > 30


def test_the_tie_cases_hold_what_the_offline_order_says(
    built: tuple[Path, list[Event]], online: Online
) -> None:
    """Spot checks that the fixture's ties mean what they should (the cases above, by name)."""
    warehouse, events = built
    rows = {r["event_id"]: r for r in query(warehouse, "select * from main.fct_cart_events")}
    by_id = {e.event_id: e for e in events}

    def served(event_id: str, with_id: bool = True) -> dict[str, float]:
        cart = by_id[event_id]
        return session_features(
            online.sessions[cart.user_session],
            cart.product_id,
            cart.event_time,
            event_id if with_id else None,
        )

    opener = served("opener-cart")
    assert opener == {name: 0.0 for name in SESSION_FEATURES}
    assert rows["opener-cart"]["label"] == 1  # the purchase at the same instant comes later

    triple = next(e for e in events if e.event_id.startswith("!"))
    middle, first, last = triple.event_id[1:], triple.event_id, triple.event_id[1:] + "~"
    carts_before = {k: served(k)["session_carts"] for k in (first, middle, last)}
    assert carts_before[middle] == carts_before[first] + 1
    assert carts_before[last] == carts_before[first] + 2
    assert {k: float(rows[k]["session_carts"]) for k in carts_before} == carts_before
    # Unknown ids: none of the three counts another of them.
    assert {served(k, with_id=False)["session_carts"] for k in carts_before} == {
        carts_before[first]
    }
