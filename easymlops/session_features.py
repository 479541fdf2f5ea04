"""Real-time session features: one definition, applied by the stream (local runner and Flink job)
to keep `feat:session:{user_session}` current in Redis, and read back by serving.

The offline twin is dbt_project/models/marts/fct_cart_events.sql; both count the events of the
session strictly before the prediction moment (tests/test_session_features.py checks that they
agree on real data). Every feature is a count, a set size or a minimum, so the result does not
depend on the order the stream delivers a session's events in.

Stored per session (a Redis hash, expiring `session_ttl_seconds` after its last event):
- `session_events`, `session_views`, `session_carts`: counts of events so far;
- `session_start`: epoch seconds of the session's earliest event;
- `session_distinct_products`: products viewed at least once;
- `pv:{product_id}`: views of that product, from which serving reads `session_product_views`.
Serving derives `session_seconds` = request moment - `session_start`.

Updates are idempotent per event id (a set of applied ids beside the hash, same expiry): the
stream writes Redis before it commits its Kafka transaction, so a batch replayed after a crash
or an aborted transaction changes nothing twice.

Stdlib only (plus the redis client passed in): the Flink job's virtualenv imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from easymlops.features import session_key
from easymlops.schema import Event

PRODUCT_VIEWS_PREFIX = "pv:"
START_FIELD = "session_start"


def applied_key(user_session: str) -> str:
    """The set of event ids already counted in a session's hash."""
    return f"{session_key(user_session)}:applied"


@dataclass
class SessionState:
    """A session's aggregates after some of its events; the same fold runs in Flink keyed state."""

    events: int = 0
    views: int = 0
    carts: int = 0
    start: float | None = None
    product_views: dict[int, int] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        self.events += 1
        if event.event_type == "view":
            self.views += 1
            self.product_views[event.product_id] = self.product_views.get(event.product_id, 0) + 1
        elif event.event_type == "cart":
            self.carts += 1
        ts = event.event_time.timestamp()
        self.start = ts if self.start is None else min(self.start, ts)

    @classmethod
    def of(cls, events: Iterable[Event]) -> SessionState:
        state = cls()
        for event in events:
            state.apply(event)
        return state

    def to_hash(self) -> dict[str, str]:
        """The Redis hash for this state (what the Lua script below maintains incrementally)."""
        fields = {
            "session_events": str(self.events),
            "session_views": str(self.views),
            "session_carts": str(self.carts),
            "session_distinct_products": str(len(self.product_views)),
        }
        if self.start is not None:
            fields[START_FIELD] = repr(self.start)
        for product_id, views in self.product_views.items():
            fields[f"{PRODUCT_VIEWS_PREFIX}{product_id}"] = str(views)
        return fields


def features_at(session_hash: Mapping[str, str], product_id: int, at: datetime) -> dict[str, float]:
    """The model's session features for a cart of `product_id` at `at`, from a stored hash.

    An absent hash means no earlier event of the session was seen: all zeros, exactly what the
    offline definition gives a cart that opens its session."""
    start = float(session_hash.get(START_FIELD, at.timestamp()))
    return {
        "session_events": float(session_hash.get("session_events", 0)),
        "session_views": float(session_hash.get("session_views", 0)),
        "session_product_views": float(session_hash.get(f"{PRODUCT_VIEWS_PREFIX}{product_id}", 0)),
        "session_carts": float(session_hash.get("session_carts", 0)),
        "session_seconds": max(0.0, at.timestamp() - start),
        "session_distinct_products": float(session_hash.get("session_distinct_products", 0)),
    }


# One call per group of sessions. KEYS: per session its hash and its applied-ids set. ARGV: ttl,
# then per session the number of its events and four values per event: event_id, event_type,
# product_id, epoch seconds. Events already applied (their id is in the set) are skipped, so a
# replayed batch changes nothing. The counts are summed here and written once per field; returns
# how many events were new. Several sessions per call because redis-py's per-command cost (and
# the server's per-script setup) was most of the features' cost with one call per session.
APPLY_EVENTS_LUA = """
local ttl, a, total = ARGV[1], 2, 0
for s = 1, #KEYS, 2 do
  local h, applied = KEYS[s], KEYS[s + 1]
  local first = a + 1
  local last = a + 4 * tonumber(ARGV[a])
  a = last + 1
  local events, views, carts, new_products, start = 0, 0, 0, 0, nil
  local product_views = {}
  for i = first, last, 4 do
    if redis.call('SADD', applied, ARGV[i]) == 1 then
      events = events + 1
      if ARGV[i + 1] == 'view' then
        views = views + 1
        product_views[ARGV[i + 2]] = (product_views[ARGV[i + 2]] or 0) + 1
      elseif ARGV[i + 1] == 'cart' then
        carts = carts + 1
      end
      local ts = tonumber(ARGV[i + 3])
      if start == nil or ts < start then start = ts end
    end
  end
  if events > 0 then
    for product, n in pairs(product_views) do
      if redis.call('HINCRBY', h, 'pv:' .. product, n) == n then
        new_products = new_products + 1
      end
    end
    -- every count field exists from the first event on, as in SessionState.to_hash
    redis.call('HINCRBY', h, 'session_events', events)
    redis.call('HINCRBY', h, 'session_views', views)
    redis.call('HINCRBY', h, 'session_carts', carts)
    redis.call('HINCRBY', h, 'session_distinct_products', new_products)
    local stored = redis.call('HGET', h, 'session_start')
    if (not stored) or start < tonumber(stored) then
      -- the caller's repr() of the float, kept as text so the stored value round-trips exactly
      for i = first, last, 4 do
        if tonumber(ARGV[i + 3]) == start then
          redis.call('HSET', h, 'session_start', ARGV[i + 3])
          break
        end
      end
    end
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', applied, ttl)
    total = total + events
  end
end
return total
"""
# Sessions per script call: few calls per batch, yet each call short, since a script blocks
# Redis (serving's reads included) while it runs.
SESSIONS_PER_CALL = 200


class SessionFeatureWriter:
    """Applies validated events to Redis: one script call per session, pipelined in one round
    trip per batch (a batch of 5,000 events touches a few hundred sessions)."""

    def __init__(self, client: Any, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self._sha: str | None = None

    def apply(self, events: Sequence[Event]) -> int:
        """Count each event once; return how many were new. Raises redis errors to the caller,
        which retries the batch (safe: re-applying is a no-op)."""
        by_session: dict[str, list[Any]] = {}
        for event in events:
            values = by_session.get(event.user_session)
            if values is None:
                values = by_session[event.user_session] = [0]
            values[0] += 1
            values += (
                event.event_id,
                event.event_type,
                event.product_id,
                repr(event.event_time.timestamp()),
            )
        if not by_session:
            return 0
        if self._sha is None:
            self._sha = self.client.script_load(APPLY_EVENTS_LUA)
        pipe = self.client.pipeline(transaction=False)
        sessions = list(by_session.items())
        for lo in range(0, len(sessions), SESSIONS_PER_CALL):
            keys: list[str] = []
            args: list[Any] = [self.ttl_seconds]
            for user_session, values in sessions[lo : lo + SESSIONS_PER_CALL]:
                keys += (session_key(user_session), applied_key(user_session))
                args += values
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        try:
            results = pipe.execute()
        except Exception as exc:
            # After a Redis restart the script cache is empty: load it again and retry once.
            if "NOSCRIPT" not in str(exc):
                raise
            self._sha = None
            return self.apply(events)
        return sum(int(r) for r in results)
