"""The history oracle (easymlops.history_oracle): its decisions are the generator's, its
posteriors find planted latents, and its bounds sit between knowing nothing and the oracle."""

from __future__ import annotations

import dataclasses
from datetime import date

import numpy as np
import polars as pl
import pytest

from easymlops import gate
from easymlops import generator as g
from easymlops import history_oracle as ho

SEED, EVENTS, DAYS = 11, 12_000, 4


@pytest.fixture(scope="module")
def run() -> tuple[g.World, pl.DataFrame, dict[str, float]]:
    world = g.build_world(*g.default_sizes(EVENTS), SEED)
    truth: dict[str, float] = {}
    events = list(
        g.generate_events(
            EVENTS, days=DAYS, seed=SEED, start=date(2026, 1, 1), world=world,
            truth=lambda event_id, p, _drawn: truth.__setitem__(event_id, p),
        )
    )  # fmt: skip
    users, products = world.user_index(), world.product_index()
    frame = pl.DataFrame(
        {
            "event_id": [e["event_id"] for e in events],
            "event_time": [e["event_time"] for e in events],
            "event_type": [e["event_type"] for e in events],
            "user": [users[e["user_id"]] for e in events],
            "product": [products[e["product_id"]] for e in events],
            "user_session": [e["user_session"] for e in events],
        }
    ).with_columns(pl.col("event_time").str.to_datetime(time_zone="UTC"))
    return world, frame, truth


def test_decisions_are_the_generators(run) -> None:
    _, events, _ = run
    dec = ho.decisions(events)
    carts = events.filter(pl.col("event_type") == "cart")
    bought = events.filter(pl.col("event_type") == "purchase").select("user_session", "product")
    buys = dec.frame.filter(pl.col("kind") == "buy")
    assert buys.height == carts.height == dec.carts.height
    # Nothing was lost as invalid here, so every cart has the view that led to it.
    assert dec.carts["trigger"].null_count() == 0
    triggers = dec.frame[dec.carts["trigger"].to_list()]
    assert triggers["kind"].unique().to_list() == ["cart"] and triggers["y"].min() == 1
    led_to_cart = dec.frame.filter((pl.col("kind") == "cart") & (pl.col("y") == 1))
    assert led_to_cart.height == carts.height
    assert int(buys["y"].sum()) == bought.unique().height


def planted(world: g.World, *, user: float, quality: float) -> g.World:
    return dataclasses.replace(
        world,
        user_propensity=np.where(np.arange(world.n_users) == 0, user, world.user_propensity),
        product_quality=np.where(np.arange(world.n_products) == 0, quality, world.product_quality),
    )


@pytest.mark.parametrize(("user", "quality"), [(1.5, -1.2), (-0.8, 2.0)])
def test_posterior_finds_a_planted_latent(run, user: float, quality: float) -> None:
    """Decisions drawn from the generator's formulas with a planted u and q: the posterior
    mean over GRID lands on them. A wrong sign or coefficient in the likelihood would not."""
    world = planted(run[0], user=user, quality=quality)
    rng = np.random.default_rng(3)
    n = 20000
    kinds = np.where(np.arange(n) % 2 == 0, "cart", "buy")
    v = rng.integers(1, 5, n)
    for side in ("user", "product"):
        users = np.zeros(n, int) if side == "user" else rng.integers(0, world.n_users, n)
        products = rng.integers(0, world.n_products, n) if side == "user" else np.zeros(n, int)
        u, q = world.user_propensity[users], world.product_quality[products]
        price = world.user_price_sensitivity[users] * (world.product_price_ratio[products] - 1)
        cart_p = 1 / (1 + np.exp(-(g.CART_BIAS + g.CART_USER * u + g.CART_PRODUCT * q
                                   + g.CART_VIEWS * np.log(v) - g.CART_PRICE * price)))  # fmt: skip
        buy_p = g.purchase_probability(
            g.PURCHASE_BIAS + u + q + g.PURCHASE_VIEWS * np.log1p(v) - g.PURCHASE_PRICE * price
        )
        y = (rng.random(n) < np.where(kinds == "cart", cart_p, buy_p)).astype(int)
        dec = pl.DataFrame({"kind": kinds, "user": users, "product": products, "v": v, "y": y})
        user_ll, product_ll = ho.decision_logliks(world, dec)
        log_post = -(ho.GRID**2) / 2 + (user_ll if side == "user" else product_ll).sum(axis=0)
        post = np.exp(log_post - log_post.max())
        mean = float(ho.GRID @ post / post.sum())
        assert mean == pytest.approx(user if side == "user" else quality, abs=0.08), side


def test_bounds_sit_between_knowing_nothing_and_the_oracle(run) -> None:
    world, events, truth = run
    last_day = events["event_time"].dt.date().max()
    carts = events.filter(
        (pl.col("event_type") == "cart") & (pl.col("event_time").dt.date() == last_day)
    )
    bought = events.filter(pl.col("event_type") == "purchase").select(
        "user_session", "product", label=pl.lit(1)
    )
    carts = carts.join(bought.unique(), on=["user_session", "product"], how="left")
    y = carts["label"].fill_null(0).to_numpy()
    scores = ho.history_scores(world, events, carts.select("event_id"))
    auc = {history: gate.auc(y, s) for history, s in scores.items()}
    oracle = gate.auc(y, np.array([truth[e] for e in carts["event_id"]]))
    # Three days of history are worth far more than knowing nothing (0.56 vs 0.70 measured)...
    assert auc["day"] > auc["none"] + 0.05, auc
    # ...and even the most generous history is short of knowing the latents (0.72 vs 0.79).
    assert max(auc.values()) < oracle - 0.02, (auc, oracle)


def test_world_of_truth_file_refuses_other_names() -> None:
    world = ho.world_of_truth_file("synthetic-seed11-n12000-days4-from2026-01-01")
    assert world.n_users == g.default_sizes(12_000)[0]
    with pytest.raises(ValueError, match="not a synthetic run"):
        ho.world_of_truth_file("replay-2019-Oct")
