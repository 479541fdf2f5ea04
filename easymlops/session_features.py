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

Stdlib and redis only: the Flink job's virtualenv imports this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.exceptions import NoScriptError

from easymlops.features import session_key
from easymlops.schema import Event

PRODUCT_VIEWS_PREFIX = "pv:"
START_FIELD = "session_start"


def applied_key(user_session: str) -> str:
    """The set of event ids already counted in a session's hash (as `applied_token`s)."""
    return f"{session_key(user_session)}:applied"


def applied_token(event_id: str) -> str:
    """An event id as kept in the applied set: itself, unless it is empty, holds a space (the
    separator of the ids sent to the script) or starts with "#"; then "#" and its hash, so
    distinct ids keep distinct tokens."""
    if not event_id or " " in event_id or event_id.startswith("#"):
        return "#" + hashlib.blake2b(event_id.encode(), digest_size=16).hexdigest()
    return event_id


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
# then five per session: its views, carts and start (the client's SessionState of the events
# sent), their applied tokens (see `applied_token`) joined by spaces, and "product views ..."
# pairs joined by spaces. The client sums the events (SessionState, the same fold as Flink's)
# and the script applies the sums, but only if none of the tokens is in the applied set: one
# SMISMEMBER, one SADD, one HMGET and one HSET per session. (The first form of this script took
# four arguments and a SADD per event: 7 us of Redis and 4 us of client time per event, most of
# the client's in redis-py packing the arguments.) A session with a token already applied (a
# batch replayed after a crash) is left untouched and reported with the flags of its tokens; the
# client sends its other events again. So a replayed batch changes nothing. Returns
# {new events, {session index (1-based), flags, ...}}.
APPLY_SESSIONS_LUA = """
local ttl, a, total, seen_in = ARGV[1], 2, 0, {}
for s = 1, #KEYS, 2 do
  local h, applied = KEYS[s], KEYS[s + 1]
  local views, carts, start = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local ids, products = {}, {}
  for id in string.gmatch(ARGV[a + 3], '[^ ]+') do ids[#ids + 1] = id end
  for word in string.gmatch(ARGV[a + 4], '[^ ]+') do products[#products + 1] = word end
  a = a + 5
  local n = #ids
  local seen = redis.call('SMISMEMBER', applied, unpack(ids))
  local clean = true
  for i = 1, n do
    if seen[i] == 1 then clean = false break end
  end
  if clean then
    redis.call('SADD', applied, unpack(ids))
    -- read every field this session touches in one call, write them back in one call
    local fields = {'session_events', 'session_views', 'session_carts',
                    'session_distinct_products', 'session_start'}
    for p = 1, #products, 2 do fields[#fields + 1] = 'pv:' .. products[p] end
    local old = redis.call('HMGET', h, unpack(fields))
    local new_products, values = 0, {}
    for p = 1, #products, 2 do
      local i = 5 + (p + 1) / 2
      if not old[i] then new_products = new_products + 1 end
      values[#values + 1] = fields[i]
      values[#values + 1] = (tonumber(old[i]) or 0) + tonumber(products[p + 1])
    end
    -- every count field exists from the first event on, as in SessionState.to_hash
    values[#values + 1] = 'session_events'
    values[#values + 1] = (tonumber(old[1]) or 0) + n
    values[#values + 1] = 'session_views'
    values[#values + 1] = (tonumber(old[2]) or 0) + tonumber(views)
    values[#values + 1] = 'session_carts'
    values[#values + 1] = (tonumber(old[3]) or 0) + tonumber(carts)
    values[#values + 1] = 'session_distinct_products'
    values[#values + 1] = (tonumber(old[4]) or 0) + new_products
    if (not old[5]) or tonumber(start) < tonumber(old[5]) then
      -- the client's repr() of the float, kept as text so the stored value round-trips exactly
      values[#values + 1] = 'session_start'
      values[#values + 1] = start
    end
    redis.call('HSET', h, unpack(values))
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', applied, ttl)
    total = total + n
  else
    seen_in[#seen_in + 1] = (s + 1) / 2
    seen_in[#seen_in + 1] = seen
  end
end
return {total, seen_in}
"""
# Sessions per script call: few calls per batch, yet each call short, since a script blocks
# Redis (serving's reads included) while it runs.
SESSIONS_PER_CALL = 200
# Event ids per session entry: Lua's unpack() takes at most ~8,000 values; a session with more
# events in one call is sent as several entries, each applied on its own.
IDS_PER_ENTRY = 1000

_Entry = tuple[str, list[Event]]  # a session and some of its events, distinct ids


class SessionFeatureWriter:
    """Applies validated events to Redis (6.2 or later, for SMISMEMBER): their sums per
    session, one script call per SESSIONS_PER_CALL sessions, pipelined in one round trip per
    call to `apply` (and a second one for the sessions of a replayed batch)."""

    def __init__(self, client: Any, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds
        self._sha: str | None = None

    def apply(self, events: Sequence[Event]) -> int:
        """Count each event once; return how many were new. Raises redis errors to the caller,
        which retries the batch (safe: re-applying is a no-op)."""
        by_session: dict[str, dict[str, Event]] = {}
        for event in events:
            ids = by_session.get(event.user_session)
            if ids is None:
                ids = by_session[event.user_session] = {}
            ids.setdefault(event.event_id, event)  # a repeated id counts once
        pending: list[_Entry] = []
        for user_session, ids in by_session.items():
            distinct = list(ids.values())
            for lo in range(0, len(distinct), IDS_PER_ENTRY):
                pending.append((user_session, distinct[lo : lo + IDS_PER_ENTRY]))
        total = 0
        for attempt in (1, 2):
            try:
                # Each round either applies a session's events or drops at least one id found
                # applied, so this ends; a second round happens only for replayed events.
                while pending:
                    applied, pending = self._apply_entries(pending)
                    total += applied
                break
            except NoScriptError:
                # After a Redis restart the script cache is empty: load the script again (the
                # round is sent again whole, which is safe: applied ids are skipped).
                if attempt == 2:
                    raise
                self._sha = None
        return total

    def _apply_entries(self, entries: list[_Entry]) -> tuple[int, list[_Entry]]:
        """One pipelined round; returns the events applied and the entries to send again
        (without their ids found applied)."""
        if self._sha is None:
            self._sha = self.client.script_load(APPLY_SESSIONS_LUA)
        pipe = self.client.pipeline(transaction=False)
        calls = [
            entries[lo : lo + SESSIONS_PER_CALL] for lo in range(0, len(entries), SESSIONS_PER_CALL)
        ]
        for call in calls:
            keys: list[str] = []
            args: list[Any] = [self.ttl_seconds]
            for user_session, session_events in call:
                state = SessionState.of(session_events)
                keys += (session_key(user_session), applied_key(user_session))
                ids = [event.event_id for event in session_events]
                tokens = " ".join(ids)
                if tokens.count(" ") != len(ids) - 1 or "#" in tokens or not all(ids):
                    # rare (validated events never have an empty id): see applied_token
                    tokens = " ".join(map(applied_token, ids))
                args += (
                    state.views,
                    state.carts,
                    repr(state.start),
                    tokens,
                    " ".join(f"{p} {n}" for p, n in state.product_views.items()),
                )
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        total = 0
        again: list[_Entry] = []
        for call, (applied, seen_in) in zip(calls, pipe.execute(), strict=True):
            total += int(applied)
            for i in range(0, len(seen_in), 2):
                user_session, session_events = call[int(seen_in[i]) - 1]
                fresh = [
                    e for e, seen in zip(session_events, seen_in[i + 1], strict=True) if not seen
                ]
                if fresh:
                    again.append((user_session, fresh))
        return total, again
