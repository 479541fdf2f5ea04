"""How much of the oracle a point-in-time model can reach at all: the history oracle.

The oracle (`easymlops.truth`) knows each user's propensity `u_i` and each product's quality
`q_p`. A model never does: it can only estimate them from the events it has seen. The history
oracle is the Bayes-optimal score given that history,

    E[ P(purchase | u, q, session, price) | history ],   u ~ posterior(u_i), q ~ posterior(q_p)

with each posterior computed on a grid from the generator's own likelihoods (module docstring of
`easymlops.generator`): every cart decision after a view (`P(cart)`), every purchase outcome
after a cart (`P(purchase | cart)`, the per-cart noise integrated out), the user's number of
sessions (activity weight) and the product's number of first views in a session (popularity).

It is a generous bound, not an estimate of a real model: each posterior is computed with every
other latent known (the other side's latent, the user's price sensitivity `s_i`, the totals of
the activity and popularity weights), which no model knows. So a model's AUC above the bound
is noise, and a goal above the bound cannot be met on that data by any model.

Histories, from the least to the most a model sees:
- `none`: only the knowledge that this view led to a cart (every scored row is a cart), for
  reference: what the latents are worth;
- `day`: events of days before the cart's day (the day-level user and product features), plus
  the knowledge that this view led to a cart (every scored row is a cart);
- `day_session`: also the cart's own session before the cart (the session features);
- `stream`: every event strictly before the cart (real-time user and product features).

`python -m easymlops.history_oracle` (or `make oracle-bound`) scores the warehouse's held-out
carts of a synthetic run and prints the oracle, the three bounds and their ratios to the oracle.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from easymlops import gate
from easymlops import generator as g
from easymlops.settings import Settings

GRID = np.linspace(-4.5, 4.5, 91)  # latent values: both latents are N(0, 1) a priori
_LOG_PRIOR = -(GRID**2) / 2
_NUISANCE = np.linspace(-4.0, 4.0, 33)  # the N(0, 1) noise of activity and popularity weights
_NUISANCE_LOG_WEIGHT = -(_NUISANCE**2) / 2 - np.log(np.exp(-(_NUISANCE**2) / 2).sum())
HISTORIES: tuple[str, ...] = ("none", "day", "day_session", "stream")
TRUTH_NAME = re.compile(r"synthetic-seed(\d+)-n(\d+)-days(\d+)-from")


@dataclass(frozen=True)
class Decisions:
    """The behaviour the history holds, one row per decision, in time order: `kind` "cart"
    (a view of a product not yet carted in its session; `y` = it led to a cart) or "buy" (a
    cart; `y` = it was purchased); `v` = views of the product in the session so far."""

    frame: pl.DataFrame  # row, kind, time, day, user, product, session, v, known, y
    carts: pl.DataFrame  # event_id of each cart -> its "buy" row and its triggering view's row


def decisions(events: pl.DataFrame) -> Decisions:
    """`events`: event_id, event_time, event_type, user (world index), product (world index),
    user_session. A cart's triggering view is the last view before it (the generator carts
    right after a view, before the next one); a cart whose view is missing (lost as invalid)
    counts as a purchase outcome only. `known` is when a decision's outcome shows: a cart or a
    purchase when it happens, a view not carted at the session's next event, a cart not bought
    at the session's end."""
    rows: list[tuple] = []
    cart_rows: list[tuple[str, int, int | None]] = []
    ordered = events.sort("event_time", "event_id").with_columns(day=_day(pl.col("event_time")))
    for (session,), group in ordered.group_by(["user_session"], maintain_order=True):
        bought = dict(
            group.filter(pl.col("event_type") == "purchase")
            .group_by("product")
            .agg(pl.col("event_time").min())
            .iter_rows()
        )
        end = group["event_time"].max()
        views: dict[int, int] = {}
        carted: set[int] = set()
        pending: tuple | None = None
        for event_id, time, day, etype, user, product in group.select(
            "event_id", "event_time", "day", "event_type", "user", "product"
        ).iter_rows():
            trigger = None  # the row of the view that led to this event, if it is a cart
            if pending is not None and etype in ("view", "cart"):
                led_to_cart = etype == "cart" and pending[4] == product and product not in carted
                if led_to_cart:
                    trigger = len(rows)
                rows.append((*pending, time, int(led_to_cart)))
                pending = None
            if etype == "view":
                views[product] = views.get(product, 0) + 1
                if product not in carted:
                    pending = ("cart", time, day, user, product, session, views[product])
            elif etype == "cart" and product not in carted:
                carted.add(product)
                cart_rows.append((event_id, len(rows), trigger))
                rows.append(
                    ("buy", time, day, user, product, session, views.get(product, 1),
                     bought.get(product, end), int(product in bought))
                )  # fmt: skip
        if pending is not None:
            rows.append((*pending, end, 0))
    frame = pl.DataFrame(
        rows,
        schema=["kind", "time", "day", "user", "product", "session", "v", "known", "y"],
        orient="row",
    ).with_row_index("row")
    return Decisions(
        frame=frame,
        carts=pl.DataFrame(
            cart_rows,
            schema={"event_id": pl.Utf8, "row": pl.Int64, "trigger": pl.Int64},
            orient="row",
        ),
    )


def _day(time: pl.Expr) -> pl.Expr:
    """Days since 1970-01-01: an integer, for numpy comparisons."""
    return time.dt.date().cast(pl.Int32)


def _bernoulli_loglik(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return y[:, None] * np.log(p) + (1 - y[:, None]) * np.log1p(-p)


def decision_logliks(world: g.World, dec: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(L_user, L_product): each decision's log-likelihood over GRID, for the user's latent
    (the product's known) and for the product's latent (the user's known)."""
    user = dec["user"].to_numpy()
    product = dec["product"].to_numpy()
    v = dec["v"].to_numpy().astype(np.float64)
    y = dec["y"].to_numpy().astype(np.float64)
    is_buy = (dec["kind"] == "buy").to_numpy()
    u, q = world.user_propensity[user], world.product_quality[product]
    price = world.user_price_sensitivity[user] * (world.product_price_ratio[product] - 1.0)
    out = []
    for known, cart_coef, cart_known_coef in (
        (q, g.CART_USER, g.CART_PRODUCT),
        (u, g.CART_PRODUCT, g.CART_USER),
    ):
        cart_logit = (
            g.CART_BIAS + cart_known_coef * known + g.CART_VIEWS * np.log(v)
            - g.CART_PRICE * price
        )[:, None] + cart_coef * GRID[None, :]  # fmt: skip
        buy_logit = (
            g.PURCHASE_BIAS + g.PURCHASE_VIEWS * np.log1p(v) - g.PURCHASE_PRICE * price + known
        )[:, None] + GRID[None, :]  # fmt: skip (both purchase coefficients are 1)
        loglik = _bernoulli_loglik(y, 1.0 / (1.0 + np.exp(-cart_logit)))
        buys = np.flatnonzero(is_buy)
        buy_p = g.purchase_probability(buy_logit[buys].ravel()).reshape(len(buys), len(GRID))
        loglik[buys] = _bernoulli_loglik(y[buys], buy_p)
        out.append(loglik)
    return out[0], out[1]


def _count_loglik(count: float, rate_at_grid: np.ndarray) -> np.ndarray:
    """log P(count) of a Poisson count over GRID, its rate's log-normal noise integrated out:
    `rate_at_grid` is (len(GRID), len(_NUISANCE))."""
    log_p = count * np.log(rate_at_grid) - rate_at_grid + _NUISANCE_LOG_WEIGHT[None, :]
    top = log_p.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(log_p - top).sum(axis=1, keepdims=True)))[:, 0]


def history_scores(
    world: g.World, events: pl.DataFrame, carts: pl.DataFrame
) -> dict[str, np.ndarray]:
    """The history oracle of each cart of `carts` (event_id, in the order given) under each of
    HISTORIES. `events` as for `decisions`, the carts' own days included."""
    dec = decisions(events)
    frame = dec.frame
    user_ll, product_ll = decision_logliks(world, frame)
    time = frame["time"].to_numpy()
    known = frame["known"].to_numpy()  # when each outcome shows: only those before a cart count
    day = frame["day"].to_numpy()
    session = frame["session"].to_numpy()
    by_user = {k: np.asarray(v) for k, v in frame.group_by("user").agg("row").iter_rows()}
    by_product = {k: np.asarray(v) for k, v in frame.group_by("product").agg("row").iter_rows()}

    # Sessions per user and first views of a product in a session (activity and popularity
    # weights), counted over the days before each cart's day.
    session_days = events.group_by("user_session").agg(
        pl.col("user").first(), day=_day(pl.col("event_time").min())
    )
    first_views = (
        events.filter(pl.col("event_type") == "view")
        .group_by("user_session", "product")
        .agg(day=_day(pl.col("event_time").min()))
        .with_columns(category=pl.col("product").replace_strict(
            dict(enumerate(world.product_category.tolist())), return_dtype=pl.Int64
        ))
    )  # fmt: skip
    popularity_total = np.bincount(world.product_category, weights=world.product_popularity)

    def counts_before(frame: pl.DataFrame, key: str, before: int) -> dict[int, int]:
        return dict(frame.filter(pl.col("day") < before).group_by(key).len().iter_rows())

    rows = carts.join(dec.carts, on="event_id", how="left", maintain_order="left")
    if rows["row"].null_count():
        raise ValueError(f"{rows['row'].null_count()} carts are not cart events of `events`")
    scores: dict[str, list[float]] = {h: [] for h in HISTORIES}
    log_activity = 0.9 * _NUISANCE[None, :] + 0.3 * GRID[:, None]
    log_popularity = 0.5 * GRID[:, None] + _NUISANCE[None, :]
    cache: dict[int, tuple[int, dict[int, int], dict[int, int], dict[int, int]]] = {}
    for row, trigger in rows.select("row", "trigger").iter_rows():
        user, product = int(frame["user"][row]), int(frame["product"][row])
        cart_day, cart_time = int(day[row]), time[row]
        if cart_day not in cache:
            cache[cart_day] = (
                int((session_days["day"] < cart_day).sum()),
                counts_before(session_days, "user", cart_day),
                counts_before(first_views, "product", cart_day),
                counts_before(first_views, "category", cart_day),
            )
        n_sessions, user_sessions, product_picks, category_picks = cache[cart_day]
        activity_rate = n_sessions * np.exp(log_activity) / world.user_activity.sum()
        c = int(world.product_category[product])
        pick_rate = category_picks.get(c, 0) * np.exp(log_popularity) / popularity_total[c]
        user_counts = _count_loglik(user_sessions.get(user, 0), np.maximum(activity_rate, 1e-12))
        product_counts = _count_loglik(product_picks.get(product, 0), np.maximum(pick_rate, 1e-12))
        price = world.user_price_sensitivity[user] * (world.product_price_ratio[product] - 1)
        logit = (
            g.PURCHASE_BIAS + g.PURCHASE_VIEWS * math.log1p(float(frame["v"][row]))
            - g.PURCHASE_PRICE * price
        ) + GRID[:, None] + GRID[None, :]  # fmt: skip
        p = g.purchase_probability(logit.ravel()).reshape(logit.shape)  # over (u, q)
        u_rows, p_rows = by_user[user], by_product[product]
        for history in HISTORIES:
            if history == "none":
                u_sel, p_sel = u_rows[:0], p_rows[:0]
            elif history == "stream":
                u_sel = u_rows[known[u_rows] < cart_time]
                p_sel = p_rows[known[p_rows] < cart_time]
            else:
                earlier = day[u_rows] < cart_day
                if history == "day_session":
                    earlier |= (session[u_rows] == session[row]) & (known[u_rows] < cart_time)
                u_sel = u_rows[earlier]
                p_sel = p_rows[day[p_rows] < cart_day]
            if trigger is not None:
                # Every scored row is a cart: that this view led to one is known. (No history
                # above holds it: its outcome shows at the cart's own time, on the cart's day.)
                u_sel = np.append(u_sel, trigger)
                p_sel = np.append(p_sel, trigger)
            counted = history != "none"
            log_u = _LOG_PRIOR + counted * user_counts + user_ll[u_sel].sum(axis=0)
            log_q = _LOG_PRIOR + counted * product_counts + product_ll[p_sel].sum(axis=0)
            post_u = np.exp(log_u - log_u.max())
            post_q = np.exp(log_q - log_q.max())
            scores[history].append(float(post_u @ p @ post_q / post_u.sum() / post_q.sum()))
    return {h: np.asarray(s) for h, s in scores.items()}


def world_of_truth_file(name: str) -> g.World:
    """The world behind a truth file `synthetic-seed<S>-n<N>-days<D>-from<date>` (produce's
    default world for N events and seed S)."""
    match = TRUTH_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a synthetic run's truth file")
    seed, n_events = int(match[1]), int(match[2])
    return g.build_world(*g.default_sizes(n_events), seed)


def _champion_auc(settings: Settings, test_rows: int) -> tuple[str, float] | None:
    """(label, test AUC) of the serving champion when MLflow answers and the champion was
    scored on as many held-out rows as the warehouse has now (else it was other data)."""
    from easymlops import registry
    from easymlops.services import mlflow as mlflow_service

    down = mlflow_service.health(settings)
    if down is not None:  # the bounds do not need MLflow; MLflow's client would retry for minutes
        print(f"(no champion read: {down}; pass --model-auc or start the stack)")
        return None
    model = registry.champion(settings)
    metrics = registry.version_metrics(model.version, settings) if model else {}
    if model is None or "test_auc" not in metrics:
        return None
    if int(metrics.get("test_rows", -1)) != test_rows:
        print(f"(champion v{model.version} was scored on other held-out rows; pass --model-auc)")
        return None
    return f"champion v{model.version}", metrics["test_auc"]


def main(argv: Sequence[str] | None = None) -> None:
    from easymlops import truth, warehouse
    from easymlops.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m easymlops.history_oracle", description=__doc__)
    parser.add_argument(
        "--model-auc", type=float, help="a model's AUC on the same rows (default: the champion's)"
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    files = sorted(truth.truth_dir(settings).glob("synthetic-*.parquet"))
    if len(files) != 1:
        raise SystemExit(
            f"need exactly one synthetic run's truth in {truth.truth_dir(settings)}, found "
            f"{len(files)}: the history oracle rebuilds that run's world"
        )
    world = world_of_truth_file(files[0].stem)
    test = warehouse.query_frame(
        settings,
        "select event_id, label from training_set where split = 'test' "
        "order by event_time, event_id",
    )
    events = warehouse.query_frame(
        settings,
        "select event_id, event_time, event_type, user_id, product_id, user_session "
        "from stg_events",
    )
    users, products = world.user_index(), world.product_index()
    events = events.with_columns(
        user=pl.col("user_id").replace_strict(users, return_dtype=pl.Int64),
        product=pl.col("product_id").replace_strict(products, return_dtype=pl.Int64),
    )
    known = truth.load(settings, test["event_id"].to_list())
    if known.height < test.height:
        raise SystemExit(f"{test.height - known.height} held-out carts have no ground truth")
    test = test.join(known, on="event_id", how="inner", maintain_order="left")
    y = test["label"].to_numpy()
    oracle_auc = gate.auc(y, test["purchase_probability"].to_numpy())
    print(f"held-out carts: {test.height} ({files[0].stem})")
    print(f"{'oracle (true probabilities)':<34} AUC {oracle_auc:.4f}")
    for history, scores in history_scores(world, events, test.select("event_id")).items():
        auc = gate.auc(y, scores)
        label = f"history oracle, {history}"
        print(f"{label:<34} AUC {auc:.4f}  {auc / oracle_auc:.3f} of the oracle")
    model = ("model", args.model_auc) if args.model_auc is not None else None
    model = model or _champion_auc(settings, test.height)
    if model is not None:
        label, auc = model
        print(f"{label:<34} AUC {auc:.4f}  {auc / oracle_auc:.3f} of the oracle")


if __name__ == "__main__":
    main()
