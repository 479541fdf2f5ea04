"""The synthetic event generator and the CSV replay, checked against the real validator
(`easymlops.schema`): wire form, determinism, exact invalid ratio, each invalid kind, the
documented learnable purchase behaviour, time range, throughput, and replay of the public format."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from easymlops.csv_replay import (
    CSV_COLUMNS,
    EXTRA_COLUMNS_KEY,
    CsvFormatError,
    ReplayStats,
    read_csv_events,
    read_csv_records,
)
from easymlops.generator import (
    INVALID_KINDS,
    GenerationStats,
    build_world,
    default_sizes,
    encode_event,
    generate_events,
    generate_payloads,
    make_invalid,
)
from easymlops.schema import FIELD_ORDER, Event, ValidationError, validate_bytes, validate_record

START = date(2024, 3, 1)
FIXTURE = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"
# Deliberately malformed rows of the fixture, by 1-based file line (line 1 is the header):
# line 31 has price "abc"; line 32 lacks its last column (user_session).
MALFORMED_LINES = {31: ("wrong_type", "price"), 32: ("missing_field", "user_session")}
FIXTURE_ROWS = 31


def labels_of(events: Iterable[Event]) -> list[tuple[Event, int]]:
    """Each cart with its label: 1 iff the same session purchases the same product later."""
    events = sorted(events, key=lambda e: e.event_time)
    last_purchase: dict[tuple[str, int], datetime] = {}
    for e in events:
        if e.event_type == "purchase":
            last_purchase[(e.user_session, e.product_id)] = e.event_time
    out = []
    for e in events:
        if e.event_type == "cart":
            bought = last_purchase.get((e.user_session, e.product_id))
            out.append((e, int(bought is not None and bought > e.event_time)))
    return out


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Newton-Raphson logistic regression with an intercept column already in `x`."""
    w = np.zeros(x.shape[1])
    for _ in range(25):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        w -= np.linalg.solve(hess, grad)
    return w


# -- wire form and validity -----------------------------------------------------------------------
def test_events_are_valid_wire_form() -> None:
    events = list(generate_events(5000, seed=3, start=START))
    assert len(events) == 5000
    null_codes = null_brands = 0
    for raw in events:
        assert tuple(raw) == FIELD_ORDER
        assert isinstance(raw["event_time"], str) and raw["event_time"].endswith("Z")
        for name in ("product_id", "category_id", "user_id"):
            assert type(raw[name]) is int
        assert type(raw["price"]) is float and raw["price"] >= 0
        assert raw["category_code"] is None or "." in raw["category_code"]
        null_codes += raw["category_code"] is None
        null_brands += raw["brand"] is None
        event = validate_record(raw)
        assert event.event_id == raw["event_id"]
        assert validate_bytes(encode_event(raw)) == event
    assert 0 < null_codes < len(events) and 0 < null_brands < len(events)
    assert len({e["event_id"] for e in events}) == len(events)
    assert {e["event_type"] for e in events} == {"view", "cart", "remove_from_cart", "purchase"}


def test_payloads_validate_and_match_events() -> None:
    payloads = list(generate_payloads(2000, seed=4, start=START))
    events = list(generate_events(2000, seed=4, start=START))
    assert [json.loads(p) for p in payloads] == events
    assert all(
        validate_bytes(p).event_id == e["event_id"] for p, e in zip(payloads, events, strict=True)
    )


@pytest.mark.parametrize("n", [0, 1, 6, 7, 8, 1001])
def test_exact_count(n: int) -> None:
    stats = GenerationStats()
    assert len(list(generate_payloads(n, days=7, start=START, invalid_ratio=0.5, stats=stats))) == n
    assert stats.items == n and stats.valid + stats.invalid == n
    assert stats.invalid == round(0.5 * n)


def test_deterministic_by_seed() -> None:
    def run(seed: int) -> list[bytes]:
        return list(generate_payloads(3000, seed=seed, start=START, invalid_ratio=0.1))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_event_ids_differ_between_runs_with_other_arguments() -> None:
    """Same seed, other size, days or start: distinct events must never share an id, or
    deduplication in silver would drop them."""

    def ids(n: int, days: int, start: date) -> set[str]:
        return {e["event_id"] for e in generate_events(n, days=days, seed=42, start=start)}

    base = ids(2000, 3, START)
    assert base == ids(2000, 3, START)  # a replay dedupes
    for other in (ids(2500, 3, START), ids(2000, 4, START), ids(2000, 3, START + timedelta(1))):
        assert not base & other


def test_a_run_started_a_day_later_draws_new_sessions_not_a_shifted_replay() -> None:
    """`make demo` on the next day generates from the same seed with `start` one day on. The
    users and products recur (one world), but the sessions must be new draws: a replay of the
    earlier run shifted by a day lets a user's past carts foretell their next ones exactly,
    which the promotion gate then refuses as label leakage."""

    def sessions_by_day(start: date) -> dict[str, list[tuple[int, int, str, str]]]:
        days: dict[str, list[tuple[int, int, str, str]]] = {}
        for e in generate_events(3000, days=3, seed=42, start=start):
            day, clock = e["event_time"][:10], e["event_time"][11:]
            days.setdefault(day, []).append((e["user_id"], e["product_id"], e["event_type"], clock))
        return days

    earlier, later = sessions_by_day(START), sessions_by_day(START + timedelta(1))
    for k in range(3):
        first = earlier[(START + timedelta(k)).isoformat()]
        next_run = later[(START + timedelta(k + 1)).isoformat()]
        assert first != next_run, f"day {k} of the later run replays the earlier run's day {k}"
        # Not just reordered: most of the day's (user, product, type, time) rows are new.
        assert len(set(first) & set(next_run)) < len(first) // 10
    # Same world: the later run's users are mostly the earlier run's.
    users = {row[0] for rows in earlier.values() for row in rows}
    later_users = {row[0] for rows in later.values() for row in rows}
    assert len(users & later_users) > len(later_users) // 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="days"):
        generate_events(10, days=0)
    with pytest.raises(ValueError, match="n_events"):
        generate_events(-1)
    with pytest.raises(ValueError, match="invalid_ratio"):
        generate_payloads(10, invalid_ratio=1.5)


# -- invalid payloads -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.333, 1.0])
def test_invalid_ratio_is_exact(ratio: float) -> None:
    n = 10_000
    stats = GenerationStats()
    rejected: Counter[str] = Counter()
    valid_ids = []
    for payload in generate_payloads(n, seed=9, start=START, invalid_ratio=ratio, stats=stats):
        try:
            valid_ids.append(validate_bytes(payload).event_id)
        except ValidationError as exc:
            rejected[exc.error_type] += 1
    assert sum(rejected.values()) == round(ratio * n) == stats.invalid
    # every kind is named after the error type the validator raises for it
    assert rejected == stats.invalid_by_kind
    assert stats.valid == len(valid_ids) == n - stats.invalid
    # the valid items are the event stream minus the corrupted events, in order
    events = [e["event_id"] for e in generate_events(n, seed=9, start=START)]
    kept = set(valid_ids)
    assert valid_ids == [i for i in events if i in kept]
    if 0 < ratio < 1:
        assert set(rejected) == set(INVALID_KINDS)


@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_each_invalid_kind_is_rejected(kind: str) -> None:
    rng = np.random.default_rng(1)
    bases = list(generate_events(100, seed=2, start=START))
    for i in range(200):
        payload = make_invalid(rng, kind=kind, base=bases[i % 100] if i % 2 else None)
        assert isinstance(payload, bytes)
        with pytest.raises(ValidationError) as info:
            validate_bytes(payload)
        assert info.value.error_type == kind, payload


def test_make_invalid_random_kind_and_unknown_kind() -> None:
    rng = np.random.default_rng(2)
    seen: Counter[str] = Counter()
    for _ in range(300):
        with pytest.raises(ValidationError) as info:
            validate_bytes(make_invalid(rng))
        seen[info.value.error_type] += 1
    assert set(seen) == set(INVALID_KINDS)
    with pytest.raises(ValueError, match="unknown invalid kind"):
        make_invalid(rng, kind="nope")


# -- time range -----------------------------------------------------------------------------------
def test_event_times_within_requested_days_and_sorted() -> None:
    events = [validate_record(e) for e in generate_events(9000, days=3, seed=8, start=START)]
    begin = datetime(2024, 3, 1, tzinfo=UTC)
    times = [e.event_time for e in events]
    assert times == sorted(times)
    assert begin <= times[0] and times[-1] < begin + timedelta(days=3)
    per_day = Counter(t.date() for t in times)
    assert per_day == {date(2024, 3, 1): 3000, date(2024, 3, 2): 3000, date(2024, 3, 3): 3000}
    # a session never crosses midnight, and its events are in time order
    session_days: dict[str, set[date]] = defaultdict(set)
    for e in events:
        session_days[e.user_session].add(e.event_time.date())
    assert all(len(days) == 1 for days in session_days.values())


def test_default_days_end_yesterday() -> None:
    today = datetime.now(UTC).date()
    days = {validate_record(e).event_time.date() for e in generate_events(700, days=7)}
    assert days == {today - timedelta(days=k) for k in range(1, 8)}


# -- learnable behaviour --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learnable() -> dict[str, Any]:
    n, seed = 80_000, 11
    world = build_world(*default_sizes(n), seed=seed)
    events = [validate_record(e) for e in generate_events(n, seed=seed, start=START, world=world)]
    return {"world": world, "events": events, "carts": labels_of(events)}


def test_label_rate_and_latent_drivers(learnable: dict[str, Any]) -> None:
    world, carts = learnable["world"], learnable["carts"]
    y = np.array([label for _, label in carts])
    assert 0.28 <= y.mean() <= 0.45, y.mean()
    user_index, product_index = world.user_index(), world.product_index()
    u = np.array([world.user_propensity[user_index[c.user_id]] for c, _ in carts])
    q = np.array([world.product_quality[product_index[c.product_id]] for c, _ in carts])
    r = np.array([world.product_price_ratio[product_index[c.product_id]] for c, _ in carts])
    for latent, direction in ((u, 1), (q, 1), (r, -1)):
        low, high = np.quantile(latent, [1 / 3, 2 / 3])
        rates = [y[latent <= low].mean(), y[latent >= high].mean()]
        assert direction * (rates[1] - rates[0]) > 0.1, rates
    assert auc(u, y) > 0.65 and auc(q, y) > 0.65


def _cart_features(
    events: list[Event], *, leaky: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cart: price, session product views, user and product history rates (as of the
    previous day, or including the cart's own day when `leaky`), price vs category median."""
    day_totals: dict[date, dict[tuple[str, int], np.ndarray]] = defaultdict(
        lambda: defaultdict(lambda: np.zeros(2))
    )
    category_prices: dict[int, dict[int, float]] = defaultdict(dict)
    for e in events:
        category_prices[e.category_id][e.product_id] = e.price
        if e.event_type in ("cart", "purchase"):
            k = int(e.event_type == "purchase")
            day_totals[e.event_time.date()][("u", e.user_id)][k] += 1
            day_totals[e.event_time.date()][("p", e.product_id)][k] += 1
    median = {c: float(np.median(list(p.values()))) for c, p in category_prices.items()}
    days = sorted(day_totals)
    history: dict[date, dict[tuple[str, int], np.ndarray]] = {}
    running: dict[tuple[str, int], np.ndarray] = defaultdict(lambda: np.zeros(2))
    for d in days:
        if leaky:
            for key, value in day_totals[d].items():
                running[key] = running[key] + value
        history[d] = dict(running)
        if not leaky:
            for key, value in day_totals[d].items():
                running[key] = running[key] + value
    labelled = dict((c.event_id, label) for c, label in labels_of(events))
    product_views: Counter[tuple[str, int]] = Counter()
    rows, ys, day_no = [], [], []
    zero = np.zeros(2)
    for e in events:
        if e.event_type == "view":
            product_views[(e.user_session, e.product_id)] += 1
        elif e.event_type == "cart":
            d = e.event_time.date()
            uh = history[d].get(("u", e.user_id), zero)
            ph = history[d].get(("p", e.product_id), zero)
            rows.append(
                [
                    np.log(e.price),
                    np.log1p(product_views[(e.user_session, e.product_id)]),
                    (uh[1] + 0.35) / (uh[0] + 1.0),
                    np.log1p(uh[0]),
                    (ph[1] + 0.35) / (ph[0] + 1.0),
                    np.log1p(ph[0]),
                    np.log(e.price / median[e.category_id]),
                ]
            )
            ys.append(labelled[e.event_id])
            day_no.append(days.index(d))
    return np.array(rows), np.array(ys), np.array(day_no)


def _test_auc(x: np.ndarray, y: np.ndarray, day_no: np.ndarray, columns: list[int]) -> float:
    train, test = (day_no >= 1) & (day_no <= 4), day_no >= 5
    z = x[:, columns]
    z = (z - z[train].mean(0)) / (z[train].std(0) + 1e-9)
    z = np.c_[np.ones(len(z)), z]
    w = fit_logistic(z[train], y[train].astype(float))
    return auc(z[test] @ w, y[test])


def test_history_features_beat_price_only_and_leak_looks_too_good(
    learnable: dict[str, Any],
) -> None:
    events = learnable["events"]
    x, y, day_no = _cart_features(events, leaky=False)
    price_only = _test_auc(x, y, day_no, [0])
    full = _test_auc(x, y, day_no, list(range(x.shape[1])))
    user_only = _test_auc(x, y, day_no, [2, 3])
    product_only = _test_auc(x, y, day_no, [4, 5])
    session_only = _test_auc(x, y, day_no, [1])
    x_leak, y_leak, day_leak = _cart_features(events, leaky=True)
    leaky = _test_auc(x_leak, y_leak, day_leak, list(range(x.shape[1])))
    print(
        f"AUC price {price_only:.3f} session {session_only:.3f} user {user_only:.3f} "
        f"product {product_only:.3f} all {full:.3f} leaky {leaky:.3f}"
    )
    assert price_only < 0.6
    assert user_only > 0.55 and product_only > 0.6 and session_only > 0.52
    assert full > price_only + 0.12
    assert leaky > full + 0.08


def test_users_and_products_recur_across_days(learnable: dict[str, Any]) -> None:
    first_day: dict[int, date] = {}
    for e in learnable["events"]:
        first_day.setdefault(e.user_id, e.event_time.date())
    later_carts = [c for c, _ in learnable["carts"] if c.event_time.date() > START]
    returning = sum(first_day[c.user_id] < c.event_time.date() for c in later_carts)
    assert returning / len(later_carts) > 0.5


# -- volume ---------------------------------------------------------------------------------------
def test_throughput_50k_payloads() -> None:
    t0 = time.perf_counter()
    count = sum(1 for _ in generate_payloads(50_000, days=7, start=START, invalid_ratio=0.01))
    elapsed = time.perf_counter() - t0
    print(f"50k payloads in {elapsed:.2f} s ({count / elapsed:,.0f}/s)")
    assert count == 50_000 and elapsed < 10.0


def test_streams_a_day_at_a_time() -> None:
    # 10M events over 100 days: the first item comes after one day (100k events) is simulated
    t0 = time.perf_counter()
    first = next(generate_payloads(10_000_000, days=100, start=START))
    assert validate_bytes(first) and time.perf_counter() - t0 < 5.0


# -- CSV replay -----------------------------------------------------------------------------------
def test_csv_replay_of_fixture() -> None:
    stats = ReplayStats()
    payloads = read_csv_events(FIXTURE, stats=stats)
    results: dict[int, Event | ValidationError] = {}
    for line, payload in enumerate(payloads, start=2):
        try:
            results[line] = validate_bytes(payload)
        except ValidationError as exc:
            results[line] = exc
    assert stats.rows == FIXTURE_ROWS and stats.short_rows == 1 and stats.long_rows == 0
    for line, outcome in results.items():
        if line in MALFORMED_LINES:
            assert isinstance(outcome, ValidationError), line
            assert (outcome.error_type, outcome.field) == MALFORMED_LINES[line]
        else:
            assert isinstance(outcome, Event), (line, outcome)
    events = [e for e in results.values() if isinstance(e, Event)]
    assert len(events) == FIXTURE_ROWS - len(MALFORMED_LINES)
    first = events[0]
    assert first.event_time == datetime(2019, 10, 1, tzinfo=UTC)
    assert (first.category_code, first.brand, first.price) == (None, "shiseido", 35.79)
    assert any(e.brand is None and e.category_code is not None for e in events)
    assert any(e.brand is None and e.category_code is None for e in events)
    labels = [label for _, label in labels_of(events)]
    assert sorted(labels) == [0, 1, 1]  # two carts bought later, one removed


def test_csv_rows_are_replayed_as_they_are() -> None:
    records = list(read_csv_records(FIXTURE))
    assert records[0] == {
        "event_time": "2019-10-01 00:00:00 UTC",
        "event_type": "view",
        "product_id": "44600062",
        "category_id": "2103807459595387724",
        "category_code": "",
        "brand": "shiseido",
        "price": "35.79",
        "user_id": "541312140",
        "user_session": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
    }
    assert "user_session" not in records[-1]  # the short row keeps the fields it has
    assert json.loads(next(read_csv_events(FIXTURE))) == records[0]
    assert len(list(read_csv_events(FIXTURE, limit=5))) == 5


def test_csv_header_error_names_missing_columns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    header = [c for c in CSV_COLUMNS if c not in ("price", "user_id")]
    bad.write_text(",".join(header) + "\n" + ",".join(["x"] * len(header)) + "\n")
    with pytest.raises(CsvFormatError, match=r"missing column\(s\) price, user_id"):
        read_csv_events(bad)  # raised at the call, before iteration
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CsvFormatError, match="empty file"):
        read_csv_records(empty)


def test_csv_long_rows_blank_lines_and_gzip(tmp_path: Path) -> None:
    lines = FIXTURE.read_text().splitlines()
    text = "\n".join([lines[0], lines[1] + ",surplus", "", lines[2]]) + "\n"
    path = tmp_path / "sample.csv.gz"
    with gzip.open(path, "wt", newline="") as handle:
        handle.write(text)
    stats = ReplayStats()
    records = list(read_csv_records(path, stats=stats))
    assert stats.as_dict() == {"rows": 2, "short_rows": 0, "long_rows": 1, "blank_lines": 1}
    assert records[0][EXTRA_COLUMNS_KEY] == ["surplus"]
    assert validate_record(records[0]).product_id == 44600062
