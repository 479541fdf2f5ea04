"""Deterministic synthetic e-commerce events with a documented, learnable purchase behaviour.

Everything is drawn from numpy Generators seeded by `seed`: the same arguments give the same
events, byte for byte. The world (users, products, their latent traits) depends on the seed
and the run's size (`default_sizes(n_events)`); sessions depend on every argument, so a run of
the same size over other days (the next day's `make demo`) draws new sessions of the same users
and products rather than replaying old ones. Output streams day by day, so memory is bounded by
one day of events held in compact arrays (under 100 bytes per event), never by the whole run;
10M events are fine.

API
---
- `generate_events(n, days=7, seed=42, start=None)` yields exactly `n` valid events as JSON-ready
  dicts in `schema.FIELD_ORDER` (the wire form: `event_time` ISO-8601 with `Z`, ids as ints,
  `price` float, `category_code`/`brand` possibly None, `event_id` included), sorted by time.
  Days run from `start` (default: `days` days before today, UTC, so the last day is yesterday).
- `generate_payloads(n, ..., invalid_ratio=p)` yields exactly `n` Kafka message values (bytes):
  the same stream as `generate_events(n)` JSON-encoded, except that exactly `round(p * n)` of the
  events, at positions picked uniformly (selection sampling), are corrupted into invalid payloads
  by `make_invalid` (so the valid items are `generate_events(n)` minus the corrupted ones, in the
  same order, and e.g. a purchase may lose its cart, as happens with real producers).
- `make_invalid(rng, base=..., kind=...)` returns one invalid payload of a kind in
  `INVALID_KINDS`; each kind is named after the `ValidationError.error_type` that
  `schema.validate_bytes` raises for it.
- `GenerationStats`, passed as `stats=`, is updated as items are yielded.
- `build_world(...)` exposes the latent catalogue and users (for tests and analysis).

The world
---------
- 43 categories: a dotted `category_code` (5 of them null, as in the public data), a 19-digit
  `category_id`, a reference median price (12 to 700) and a popularity weight (lognormal, s=0.8).
- Products (default `clip(n // 25, 50, 2000)`): a category (by popularity), a brand from the
  category's 3 to 8 brands (null with probability 0.15), a fixed price
  `median_c * exp(N(0, 0.5))` rounded to cents, a latent quality `q_p ~ N(0, 1)` and a popularity
  weight `exp(0.5 q_p + N(0, 1))` within its category. The category median `m_c` used below is
  the median of the catalogue prices of the category's products; `r_p = price_p / m_c`.
- Users (default `max(20, n // 25)`): a latent propensity `u_i ~ N(0, 1)`, a price sensitivity
  `s_i ~ lognormal(0, 0.3)`, an activity weight `exp(0.9 N(0, 1) + 0.3 u_i)` (heavy users come
  back every day, so "as of the previous day" history exists for most carts after day 1) and a
  favourite category.

Sessions
--------
Each day gets `n // days` events (the first `n % days` days one more). Sessions are drawn until
the day's budget is met (the last one is cut short). A session picks a user by activity weight,
a focus category (the favourite with probability 0.5, else by popularity) and
`1 + Geometric` views with mean 6. Each view is a repeat view of a product already viewed in the
session with probability 0.3, else a new product from the focus category (probability 0.75) or
from any category, by product popularity. Gaps between events are `5 s + Exp(40 s)`; a session
starts at a time drawn from a diurnal profile and always ends the same day (UTC).

After each view of product p, not yet carted in this session, with `v` = views of p in the session
so far (including this one), the user adds p to the cart (3 s + Exp(15 s) later) with probability

    P(cart) = sigmoid(-2.3 + 0.4 u_i + 0.4 q_p + 0.5 log(v) - 0.5 s_i (r_p - 1))

and a cart is followed, later in the same session (10 s + Exp(180 s) after it), by a purchase of p
with probability

    P(purchase | cart) = sigmoid(B0 + A u_i + B q_p + C log1p(v) - D s_i (r_p - 1) + e),
    B0 = -3.1, A = 1.0, B = 1.0, C = 1.2, D = 1.2, e ~ N(0, 0.5^2) per cart,

otherwise by a `remove_from_cart` of p (5 s + Exp(120 s) later) with probability 0.35.
The intercept is low because carts are already selected towards high u_i and q_p: about 35%
of carts (34-38% depending on the seed and size) are followed by a purchase, the label of
DESIGN.md section 2. A session cut short by the day's budget may lose a cart's purchase.

Why it is learnable, from exactly the feature families of `easymlops.features`:
- `u_i` shows in user history (purchase rate = purchases per cart, carts, sessions) of earlier
  days, because the same users come back;
- `q_p` shows in product history (conversion rate, carts, views) of earlier days;
- `log1p(v)` is `session_product_views` at the cart;
- `r_p - 1` is `product_price_vs_category` (category median of product prices).
A price-only model sees only a weak trace of `r_p` (category medians differ 60x), so it
scores little above 0.5 AUC; a correct point-in-time model clearly beats it. A leaky model (the
session's events after the cart, or history including the cart's own day) sees the purchase
itself or a user's rate including it, and looks suspiciously good. Measured with a plain
logistic regression on those features (200k events, seed 7, train days 2-5, test days 6-7):
price only 0.54 AUC, session 0.56, user history 0.61, product history 0.70, all 0.74; with
history leaking the cart's own day: 0.89.
"""

from __future__ import annotations

import json
import math
import uuid
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any, TypeAlias

import numpy as np

from easymlops.schema import EVENT_TYPES, REQUIRED_FIELDS

# -- the documented behaviour (see the module docstring) ------------------------------------------
PURCHASE_BIAS = -3.1
PURCHASE_USER = 1.0
PURCHASE_PRODUCT = 1.0
PURCHASE_VIEWS = 1.2
PURCHASE_PRICE = 1.2
PURCHASE_NOISE = 0.5

CART_BIAS = -2.3
CART_USER = 0.4
CART_PRODUCT = 0.4
CART_VIEWS = 0.5
CART_PRICE = 0.5

MEAN_VIEWS = 6.0
P_REPEAT_VIEW = 0.3
P_FAVOURITE_FOCUS = 0.5
P_FOCUS_CATEGORY = 0.75
P_REMOVE = 0.35
P_NULL_BRAND = 0.15
PRICE_SIGMA = 0.5

VIEW_GAP = (5.0, 40.0)  # seconds: minimum + exponential mean
CART_GAP = (3.0, 15.0)
PURCHASE_DELAY = (10.0, 180.0)
REMOVE_DELAY = (5.0, 120.0)

MAX_PRODUCTS = 2000
EVENTS_PER_USER = 25

VIEW, CART, REMOVE, PURCHASE = (
    EVENT_TYPES.index(t) for t in ("view", "cart", "remove_from_cart", "purchase")
)

# (category_code, reference median price); None codes are categories without a code.
CATEGORIES: tuple[tuple[str | None, float], ...] = (
    ("electronics.smartphone", 280.0),
    ("electronics.audio.headphone", 60.0),
    ("electronics.video.tv", 420.0),
    ("electronics.clocks", 120.0),
    ("electronics.tablet", 300.0),
    ("electronics.camera.photo", 450.0),
    ("computers.notebook", 650.0),
    ("computers.desktop", 700.0),
    ("computers.peripherals.mouse", 20.0),
    ("computers.peripherals.printer", 150.0),
    ("computers.components.videocards", 380.0),
    ("appliances.kitchen.washer", 320.0),
    ("appliances.kitchen.refrigerators", 550.0),
    ("appliances.kitchen.microwave", 90.0),
    ("appliances.environment.vacuum", 160.0),
    ("appliances.environment.water_heater", 110.0),
    ("appliances.personal.hair_cutter", 35.0),
    ("appliances.iron", 40.0),
    ("furniture.living_room.sofa", 480.0),
    ("furniture.bedroom.bed", 350.0),
    ("furniture.kitchen.table", 150.0),
    ("apparel.shoes", 75.0),
    ("apparel.shoes.keds", 60.0),
    ("apparel.trousers", 45.0),
    ("apparel.jacket", 110.0),
    ("accessories.bag", 55.0),
    ("accessories.wallet", 25.0),
    ("auto.accessories.player", 90.0),
    ("auto.accessories.videoregister", 70.0),
    ("construction.tools.drill", 85.0),
    ("construction.tools.light", 20.0),
    ("kids.toys", 30.0),
    ("kids.carriage", 210.0),
    ("sport.bicycle", 320.0),
    ("sport.tennis", 45.0),
    ("country_yard.lawn_mower", 260.0),
    ("medicine.tools.tonometer", 40.0),
    ("stationery.cartrige", 25.0),
    (None, 35.0),
    (None, 12.0),
    (None, 90.0),
    (None, 18.0),
    (None, 250.0),
)

BRANDS: tuple[str, ...] = (
    "samsung", "apple", "xiaomi", "huawei", "lenovo", "hp", "asus", "acer", "lg", "sony",
    "bosch", "philips", "indesit", "haier", "beko", "artel", "redmond", "tefal", "polaris",
    "vitek", "braun", "panasonic", "canon", "nikon", "jbl", "logitech", "nike", "adidas", "puma",
    "baden", "respect", "shiseido", "luminarc", "creed", "pulser", "aqua", "makita", "dewalt",
    "stels", "cybex", "lego", "hasbro", "omron", "casio", "garmin", "elenberg", "midea",
    "gorenje", "karcher", "remington", "rowenta", "wilson", "head", "samsonite", "hp-ink",
)  # fmt: skip

# Relative session starts per UTC hour (night trough, evening peak).
HOURLY_PROFILE: tuple[float, ...] = (
    2, 1.5, 1, 1, 1, 1.5, 3, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7, 8, 9, 10, 10, 8, 5, 3,
)  # fmt: skip

INVALID_KINDS: tuple[str, ...] = (
    "missing_field",
    "bad_price",
    "unknown_event_type",
    "wrong_type",
    "malformed_json",
    "bad_timestamp",
    "not_utf8",
)

_DAY_US = 86_400_000_000
# Receives (event_id, purchase probability, drawn probability) of each generated cart: the
# generator's ground truth (see `purchase_probability`).
TruthSink: TypeAlias = Callable[[str, float, float], None]
# Gauss-Hermite nodes for the expectation over the per-cart noise e ~ N(0, PURCHASE_NOISE^2).
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite.hermgauss(40)


def purchase_probability(logit: np.ndarray) -> np.ndarray:
    """P(purchase | cart) given everything about the world (user, product, session, price):
    E_e[sigmoid(logit + e)], e ~ N(0, PURCHASE_NOISE^2), the per-cart noise averaged out.

    This is the best score any model can give a cart, the oracle: e is drawn per cart and shows
    nowhere before the purchase itself, like the coin flip that follows it. (The probability of
    the draw itself, sigmoid(logit + e), is recorded too, as `drawn_probability`.)"""
    shifted = logit[:, None] + math.sqrt(2.0) * PURCHASE_NOISE * _HERMITE_NODES[None, :]
    return np.asarray(
        (_HERMITE_WEIGHTS / (1.0 + np.exp(-shifted))).sum(axis=1) / math.sqrt(math.pi)
    )


_BLOCK = 1 << 15
_ENCODER = json.JSONEncoder(separators=(",", ":"))


# -- world ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class World:
    """The latent catalogue and users behind the events (indices are positions in the arrays)."""

    category_ids: np.ndarray  # int64
    category_codes: tuple[str | None, ...]
    category_weights: np.ndarray  # popularity, sums to 1
    category_median_price: np.ndarray  # median catalogue price of the category's products
    product_ids: np.ndarray  # int64
    product_category: np.ndarray  # index into the category arrays
    product_brand: tuple[str | None, ...]
    product_price: np.ndarray  # float64, cents
    product_quality: np.ndarray  # q_p
    product_popularity: np.ndarray  # weight within its category
    user_ids: np.ndarray  # int64
    user_propensity: np.ndarray  # u_i
    user_price_sensitivity: np.ndarray  # s_i
    user_activity: np.ndarray  # weight of being a session's user
    user_favourite_category: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_products(self) -> int:
        return len(self.product_ids)

    @property
    def product_price_ratio(self) -> np.ndarray:
        """`r_p`: price over the median price of the product's category."""
        return self.product_price / self.category_median_price[self.product_category]

    def user_index(self) -> dict[int, int]:
        return {int(uid): i for i, uid in enumerate(self.user_ids)}

    def product_index(self) -> dict[int, int]:
        return {int(pid): i for i, pid in enumerate(self.product_ids)}


def default_sizes(n_events: int) -> tuple[int, int]:
    """(users, products) for a run of `n_events` events."""
    return max(20, n_events // EVENTS_PER_USER), min(MAX_PRODUCTS, max(50, n_events // 25))


def _distinct_ids(rng: np.random.Generator, n: int, base: int, max_gap: int) -> np.ndarray:
    return base + np.cumsum(rng.integers(1, max_gap, size=n, dtype=np.int64))


def build_world(n_users: int, n_products: int, seed: int = 42) -> World:
    """Draw the catalogue and the users; deterministic in its arguments."""
    if n_users < 1 or n_products < 1:
        raise ValueError("a world needs at least one user and one product")
    rng = np.random.default_rng([seed, 0])
    n_cat = len(CATEGORIES)
    category_ids = _distinct_ids(rng, n_cat, 2_053_013_552_000_000_000, 10**12)
    category_weights = rng.lognormal(0.0, 0.8, size=n_cat)
    category_weights /= category_weights.sum()
    reference_median = np.array([m for _, m in CATEGORIES])
    category_brands = [
        [str(b) for b in rng.choice(BRANDS, size=int(rng.integers(3, 9)), replace=False)]
        for _ in range(n_cat)
    ]

    # Every category gets a product first (when there are enough), the rest by popularity.
    first = np.arange(min(n_cat, n_products))
    rest = rng.choice(n_cat, size=n_products - len(first), p=category_weights)
    product_category = np.concatenate([first, rest]).astype(np.int64)
    rng.shuffle(product_category)
    product_ids = _distinct_ids(rng, n_products, 1_000_000, 30_000)
    price = reference_median[product_category] * np.exp(rng.normal(0, PRICE_SIGMA, n_products))
    product_price = np.maximum(np.round(price, 2), 0.5)
    product_quality = rng.normal(0.0, 1.0, n_products)
    product_popularity = np.exp(0.5 * product_quality + rng.normal(0.0, 1.0, n_products))
    null_brand = rng.random(n_products) < P_NULL_BRAND
    brand_pick = rng.random(n_products)
    product_brand = tuple(
        None if null_brand[p] else category_brands[c][int(brand_pick[p] * len(category_brands[c]))]
        for p, c in enumerate(product_category.tolist())
    )
    category_median_price = reference_median.copy()
    for c in range(n_cat):
        prices = product_price[product_category == c]
        if len(prices):
            category_median_price[c] = float(np.median(prices))

    user_ids = _distinct_ids(rng, n_users, 510_000_000, 50)
    user_propensity = rng.normal(0.0, 1.0, n_users)
    user_price_sensitivity = rng.lognormal(0.0, 0.3, n_users)
    user_activity = np.exp(0.9 * rng.normal(0.0, 1.0, n_users) + 0.3 * user_propensity)
    user_favourite_category = rng.choice(n_cat, size=n_users, p=category_weights)

    return World(
        category_ids=category_ids,
        category_codes=tuple(code for code, _ in CATEGORIES),
        category_weights=category_weights,
        category_median_price=category_median_price,
        product_ids=product_ids,
        product_category=product_category,
        product_brand=product_brand,
        product_price=product_price,
        product_quality=product_quality,
        product_popularity=product_popularity,
        user_ids=user_ids,
        user_propensity=user_propensity,
        user_price_sensitivity=user_price_sensitivity,
        user_activity=user_activity,
        user_favourite_category=user_favourite_category,
    )


# -- stats ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class GenerationStats:
    """Counts of what a generator has yielded so far (updated as items are yielded)."""

    items: int = 0
    valid: int = 0
    invalid: int = 0
    sessions: int = 0
    days: int = 0
    by_event_type: Counter[str] = field(default_factory=Counter)
    invalid_by_kind: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "valid": self.valid,
            "invalid": self.invalid,
            "sessions": self.sessions,
            "days": self.days,
            "by_event_type": dict(self.by_event_type),
            "invalid_by_kind": dict(self.invalid_by_kind),
        }


# -- simulation -----------------------------------------------------------------------------------
class _Draws:
    """Uniform and normal variates drawn from a numpy Generator in blocks (fast scalar access)."""

    __slots__ = ("_i", "_j", "_normals", "_rng", "_uniforms")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._uniforms: list[float] = []
        self._normals: list[float] = []
        self._i = 0
        self._j = 0

    def uniform(self) -> float:
        i = self._i
        if i >= len(self._uniforms):
            self._uniforms = self._rng.random(_BLOCK).tolist()
            i = 0
        self._i = i + 1
        return self._uniforms[i]

    def normal(self) -> float:
        j = self._j
        if j >= len(self._normals):
            self._normals = self._rng.standard_normal(_BLOCK // 8).tolist()
            j = 0
        self._j = j + 1
        return self._normals[j]


# time (us since midnight), event type, product index, user index, session index, purchase
# logit and noise (carts; 0 else); session ids
_DayColumns: TypeAlias = (
    "tuple[array[int], array[int], array[int], array[int], array[int], array[float], "
    "array[float], list[str]]"
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class _Simulator:
    """Draws sessions for one world; columns of one day at a time."""

    def __init__(self, world: World, seed: int, run: tuple[int, ...]) -> None:
        self.world = world
        # Behaviour and session ids (and so event ids) depend on every argument of the run, not
        # only on the seed. Behaviour: a run started a day later (`make demo` on the next day)
        # must draw new sessions from the same world; drawn from the seed alone it replayed the
        # earlier run's sessions one day on, so a user's past carts foretold their next ones and
        # the gate refused the model as leaking. Ids: two runs that differ in size, days or start
        # must not reuse ids, or deduplication downstream would drop distinct events.
        self.draws = _Draws(np.random.default_rng([seed, 1, *run]))
        self.id_rng = np.random.default_rng([seed, 3, *run])
        self.user_cum = list(accumulate(world.user_activity.tolist()))
        self.category_cum = list(accumulate(world.category_weights.tolist()))
        self.category_products: list[list[int]] = []
        self.category_product_cum: list[list[float]] = []
        pop = world.product_popularity
        for c in range(len(world.category_ids)):
            members = np.flatnonzero(world.product_category == c).tolist()
            if not members:  # tiny catalogue: fall back to every product
                members = list(range(world.n_products))
            self.category_products.append(members)
            self.category_product_cum.append(list(accumulate(pop[members].tolist())))
        self.hour_cum = list(accumulate(HOURLY_PROFILE))
        self.propensity = world.user_propensity.tolist()
        self.sensitivity = world.user_price_sensitivity.tolist()
        self.favourite = world.user_favourite_category.tolist()
        self.quality = world.product_quality.tolist()
        self.price_term = (world.product_price_ratio - 1.0).tolist()
        self.log_keep_browsing = math.log(1.0 - 1.0 / MEAN_VIEWS)

    def _pick(self, cum: list[float]) -> int:
        return min(bisect_right(cum, self.draws.uniform() * cum[-1]), len(cum) - 1)

    def _product(self, category: int) -> int:
        return self.category_products[category][self._pick(self.category_product_cum[category])]

    def session(self, user: int) -> list[tuple[float, int, int, float, float]]:
        """(seconds since session start, event type, product index, purchase logit, its noise),
        sorted by time; for a cart, the purchase logit without the per-cart noise `e` and `e`
        (the draw used sigmoid(logit + e)); 0, 0 for other events."""
        uniform, normal = self.draws.uniform, self.draws.normal
        n_views = 1 + int(math.log(1.0 - uniform()) / self.log_keep_browsing)
        focus = (
            self.favourite[user] if uniform() < P_FAVOURITE_FOCUS else self._pick(self.category_cum)
        )
        u_i, s_i = self.propensity[user], self.sensitivity[user]
        events: list[tuple[float, int, int, float, float]] = []
        viewed: list[int] = []
        views: dict[int, int] = {}
        carted: set[int] = set()
        t = 0.0
        for _ in range(n_views):
            if viewed and uniform() < P_REPEAT_VIEW:
                p = viewed[int(uniform() * len(viewed))]
            else:
                category = focus if uniform() < P_FOCUS_CATEGORY else self._pick(self.category_cum)
                p = self._product(category)
                if p not in views:
                    viewed.append(p)
            t += VIEW_GAP[0] - VIEW_GAP[1] * math.log(1.0 - uniform())
            events.append((t, VIEW, p, 0.0, 0.0))
            v = views.get(p, 0) + 1
            views[p] = v
            if p in carted:
                continue
            q_p, price_term = self.quality[p], s_i * self.price_term[p]
            cart_logit = (
                CART_BIAS
                + CART_USER * u_i
                + CART_PRODUCT * q_p
                + CART_VIEWS * math.log(v)
                - CART_PRICE * price_term
            )
            if uniform() >= _sigmoid(cart_logit):
                continue
            t += CART_GAP[0] - CART_GAP[1] * math.log(1.0 - uniform())
            carted.add(p)
            logit = (
                PURCHASE_BIAS
                + PURCHASE_USER * u_i
                + PURCHASE_PRODUCT * q_p
                + PURCHASE_VIEWS * math.log1p(v)
                - PURCHASE_PRICE * price_term
            )
            noise = PURCHASE_NOISE * normal()
            events.append((t, CART, p, logit, noise))
            if uniform() < _sigmoid(logit + noise):
                delay = PURCHASE_DELAY[0] - PURCHASE_DELAY[1] * math.log(1.0 - uniform())
                events.append((t + delay, PURCHASE, p, 0.0, 0.0))
            elif uniform() < P_REMOVE:
                delay = REMOVE_DELAY[0] - REMOVE_DELAY[1] * math.log(1.0 - uniform())
                events.append((t + delay, REMOVE, p, 0.0, 0.0))
        events.sort()
        return events

    def start_us(self, duration_us: int) -> int:
        """A diurnal session start such that the session ends before midnight."""
        hour = self._pick(self.hour_cum)
        day_fraction = (hour + self.draws.uniform()) / 24.0
        return int(day_fraction * max(_DAY_US - 1 - duration_us, 0))

    def day(self, budget: int) -> _DayColumns:
        """Columns (time us since midnight, type, product, user, session index, purchase logit,
        its noise) of one day."""
        times, types, products, users = array("q"), array("b"), array("i"), array("i")
        sessions: array[int] = array("i")
        logits: array[float] = array("d")
        noises: array[float] = array("d")
        session_ids: list[str] = []
        count = 0
        while count < budget:
            user = self._pick(self.user_cum)
            events = self.session(user)[: budget - count]
            offsets = [int(t * 1e6) for t, _, _, _, _ in events]
            start = self.start_us(offsets[-1])
            s = len(session_ids)
            session_ids.append(str(uuid.UUID(bytes=self.id_rng.bytes(16), version=4)))
            for offset, (_, etype, p, logit, noise) in zip(offsets, events, strict=True):
                times.append(start + offset)
                types.append(etype)
                products.append(p)
                users.append(user)
                sessions.append(s)
                logits.append(logit)
                noises.append(noise)
            count += len(events)
        return times, types, products, users, sessions, logits, noises, session_ids


def _first_day(days: int, start: date | None) -> date:
    if start is None:
        return datetime.now(UTC).date() - timedelta(days=days)
    return start.date() if isinstance(start, datetime) else start


def _check(n_events: int, days: int) -> None:
    if n_events < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")


def generate_events(
    n_events: int,
    *,
    days: int = 7,
    seed: int = 42,
    start: date | None = None,
    world: World | None = None,
    stats: GenerationStats | None = None,
    truth: TruthSink | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield exactly `n_events` valid events (JSON-ready dicts in `FIELD_ORDER`), sorted by time,
    over `days` UTC days from `start` (default: ending yesterday). `world` defaults to
    `build_world(*default_sizes(n_events), seed)`. See the module docstring for the behaviour.

    `event_id` is the session UUID's first 28 hex digits plus the event's 4-hex-digit position in
    the session: unique across runs that differ in any argument, identical when the same run
    is replayed (so a replay dedupes).

    `truth`, if given, is called as `truth(event_id, probability, drawn_probability)` for every
    cart event of a day before that day's events are yielded (the generator's ground truth,
    kept out of the events themselves: see `purchase_probability` and `easymlops.truth`)."""
    _check(n_events, days)
    if world is None:
        world = build_world(*default_sizes(n_events), seed=seed)
    return _events(n_events, days, seed, _first_day(days, start), world, stats, truth)


def _events(
    n_events: int,
    days: int,
    seed: int,
    first_day: date,
    world: World,
    stats: GenerationStats | None,
    truth: TruthSink | None,
) -> Iterator[dict[str, Any]]:
    sim = _Simulator(world, seed, run=(n_events, days, first_day.toordinal()))
    product_ids = world.product_ids.tolist()
    category_ids = world.category_ids[world.product_category].tolist()
    codes = [world.category_codes[c] for c in world.product_category.tolist()]
    brands = world.product_brand
    prices = world.product_price.tolist()
    user_ids = world.user_ids.tolist()
    stats = stats if stats is not None else GenerationStats()
    for d in range(days):
        budget = n_events // days + (1 if d < n_events % days else 0)
        if budget == 0:
            continue
        times, types, products, users, sessions, logits, noises, session_ids = sim.day(budget)
        stats.days += 1
        t = np.frombuffer(times, dtype=np.int64)
        order = np.argsort(t, kind="stable")
        midnight = np.datetime64(first_day + timedelta(days=d), "us")
        types_np = np.frombuffer(types, dtype=np.int8)
        products_np = np.frombuffer(products, dtype=np.int32)
        users_np = np.frombuffer(users, dtype=np.int32)
        sessions_np = np.frombuffer(sessions, dtype=np.int32)
        # the rank of each event within its session (the session's events are contiguous)
        position = np.arange(len(t), dtype=np.int64) - np.searchsorted(
            sessions_np, sessions_np, side="left"
        )
        session_hex = [s.replace("-", "")[:28] for s in session_ids]
        if truth is not None:
            carts = np.flatnonzero(types_np == CART)
            logit = np.frombuffer(logits, dtype=np.float64)[carts]
            noise = np.frombuffer(noises, dtype=np.float64)[carts]
            expected = purchase_probability(logit).tolist()
            drawn = (1.0 / (1.0 + np.exp(-(logit + noise)))).tolist()
            for i, p_expected, p_drawn in zip(carts.tolist(), expected, drawn, strict=True):
                truth(f"{session_hex[sessions_np[i]]}{int(position[i]):04x}", p_expected, p_drawn)
        by_type = stats.by_event_type
        for lo in range(0, len(order), _BLOCK):
            idx = order[lo : lo + _BLOCK]
            stamps = np.datetime_as_string(
                midnight + t[idx].astype("timedelta64[us]"), unit="us", timezone="UTC"
            ).tolist()
            for stamp, etype, p, u, s, k in zip(
                stamps,
                types_np[idx].tolist(),
                products_np[idx].tolist(),
                users_np[idx].tolist(),
                sessions_np[idx].tolist(),
                position[idx].tolist(),
                strict=True,
            ):
                event_type = EVENT_TYPES[etype]
                by_type[event_type] += 1
                stats.items += 1
                stats.valid += 1
                if k == 0:
                    stats.sessions += 1
                yield {
                    "event_id": f"{session_hex[s]}{k:04x}",
                    "event_time": stamp,
                    "event_type": event_type,
                    "product_id": product_ids[p],
                    "category_id": category_ids[p],
                    "category_code": codes[p],
                    "brand": brands[p],
                    "price": prices[p],
                    "user_id": user_ids[u],
                    "user_session": session_ids[s],
                }


# -- invalid payloads -----------------------------------------------------------------------------
_BAD_TIMESTAMPS = (
    "2019-10-32 00:00:00 UTC",
    "10/01/2019 08:15:00",
    "2019-10-01T25:00:00Z",
    "yesterday",
    "",
)
_BAD_EVENT_TYPES = ("click", "add_to_cart", "VIEW", "checkout", "wishlist")


def _random_event(rng: np.random.Generator) -> dict[str, Any]:
    """A plausible valid event, for `make_invalid` without a base."""
    code, median = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    when = datetime.now(UTC) - timedelta(seconds=float(rng.uniform(3600, 7 * 86400)))
    return {
        "event_time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event_type": EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))],
        "product_id": int(rng.integers(1_000_000, 60_000_000)),
        "category_id": int(rng.integers(2_053_013_552_000_000_000, 2_175_419_595_000_000_000)),
        "category_code": code,
        "brand": str(rng.choice(BRANDS)) if rng.random() > P_NULL_BRAND else None,
        "price": round(median * float(np.exp(rng.normal(0, PRICE_SIGMA))), 2),
        "user_id": int(rng.integers(510_000_000, 600_000_000)),
        "user_session": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
    }


def make_invalid(
    rng: np.random.Generator,
    *,
    base: dict[str, Any] | None = None,
    kind: str | None = None,
) -> bytes:
    """One invalid message value: a corrupted copy of `base` (a valid event dict in the wire form,
    e.g. from `generate_events`; a random plausible event if None).

    `kind` (random if None) is one of `INVALID_KINDS`, named after the `error_type` that
    `schema.validate_bytes` raises for it:
    - missing_field: a required field dropped or set to null;
    - bad_price: a negative or non-finite price;
    - unknown_event_type: e.g. "click", "VIEW";
    - wrong_type: product_id "abc" or fractional, a non-numeric user_id, a category_id with
      thousands separators, a price with a decimal comma, a boolean user_id or a numeric
      user_session;
    - malformed_json: the JSON cut short, or a Python dict repr;
    - bad_timestamp: an unparsable event_time string;
    - not_utf8: a Latin-1 encoded payload with a non-ASCII brand.
    The corrupted payload carries no `event_id` (the validator would derive one).
    """
    record = dict(base) if base is not None else _random_event(rng)
    record.pop("event_id", None)
    if kind is None:
        kind = INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]
    variant = int(rng.integers(10))
    if kind == "missing_field":
        name = REQUIRED_FIELDS[int(rng.integers(len(REQUIRED_FIELDS)))]
        if variant % 2:
            record[name] = None
        else:
            record.pop(name, None)
    elif kind == "bad_price":
        price = float(record.get("price") or 0.0)
        record["price"] = (
            float("nan") if variant == 0 else float("-inf") if variant == 1 else -(price or 1.0)
        )
    elif kind == "unknown_event_type":
        record["event_type"] = _BAD_EVENT_TYPES[variant % len(_BAD_EVENT_TYPES)]
    elif kind == "wrong_type":
        corruptions: tuple[tuple[str, Callable[[Any], Any]], ...] = (
            ("product_id", lambda v: "abc"),
            ("product_id", lambda v: float(v) + 0.5),
            ("user_id", lambda v: f"{v}x"),
            ("category_id", lambda v: f"{int(v):,}"),
            ("price", lambda v: f"{float(v):.2f}".replace(".", ",")),
            ("user_session", lambda v: int(rng.integers(1, 10**9))),
            ("user_id", lambda v: True),
        )
        name, corrupt = corruptions[int(rng.integers(len(corruptions)))]
        record[name] = corrupt(record[name])
    elif kind == "malformed_json":
        text = _ENCODER.encode(record)
        if variant % 2:
            return repr(record).encode()
        return text[: int(rng.integers(1, len(text)))].encode()
    elif kind == "bad_timestamp":
        record["event_time"] = _BAD_TIMESTAMPS[variant % len(_BAD_TIMESTAMPS)]
    elif kind == "not_utf8":
        record["brand"] = "citroën"
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode(
            "latin-1", errors="replace"
        )
    else:
        raise ValueError(f"unknown invalid kind {kind!r}; expected one of {INVALID_KINDS}")
    return _ENCODER.encode(record).encode()


def encode_event(event: dict[str, Any]) -> bytes:
    """The wire form of a generated event (compact JSON, UTF-8)."""
    return _ENCODER.encode(event).encode()


def generate_payloads(
    n_events: int,
    *,
    days: int = 7,
    seed: int = 42,
    start: date | None = None,
    invalid_ratio: float = 0.0,
    world: World | None = None,
    stats: GenerationStats | None = None,
    truth: TruthSink | None = None,
    price_scale: float = 1.0,
) -> Iterator[bytes]:
    """Yield exactly `n_events` Kafka message values: `generate_events(n_events, ...)` encoded as
    JSON, with exactly `round(invalid_ratio * n_events)` of them, at uniformly random positions,
    replaced by `make_invalid(base=that event)` (kinds uniformly among `INVALID_KINDS`).
    `truth` receives every cart's purchase probability, as in `generate_events`.
    `price_scale` multiplies every price on the wire (a planted shift for drift monitoring; the
    behaviour, and the truth, stay those of the unscaled world)."""
    _check(n_events, days)
    if not 0.0 <= invalid_ratio <= 1.0:
        raise ValueError(f"invalid_ratio must be within [0, 1], got {invalid_ratio}")
    stats = stats if stats is not None else GenerationStats()
    inner = GenerationStats()
    events = generate_events(
        n_events, days=days, seed=seed, start=start, world=world, stats=inner, truth=truth
    )
    if price_scale != 1.0:
        events = ({**e, "price": round(e["price"] * price_scale, 2)} for e in events)
    return _payloads(events, inner, n_events, round(invalid_ratio * n_events), seed, stats)


def _payloads(
    events: Iterator[dict[str, Any]],
    inner: GenerationStats,
    n_events: int,
    n_invalid: int,
    seed: int,
    stats: GenerationStats,
) -> Iterator[bytes]:
    rng = np.random.default_rng([seed, 2])
    draws = _Draws(rng)
    left, invalid_left = n_events, n_invalid
    encode = _ENCODER.encode
    by_type = stats.by_event_type
    for event in events:
        # selection sampling (Knuth's algorithm S): exactly n_invalid of n_events, uniformly
        if invalid_left and draws.uniform() * left < invalid_left:
            invalid_left -= 1
            kind = INVALID_KINDS[int(draws.uniform() * len(INVALID_KINDS))]
            payload = make_invalid(rng, base=event, kind=kind)
            stats.invalid += 1
            stats.invalid_by_kind[kind] += 1
        else:
            payload = encode(event).encode()
            stats.valid += 1
            by_type[event["event_type"]] += 1
        left -= 1
        stats.items += 1
        stats.sessions, stats.days = inner.sessions, inner.days
        yield payload
