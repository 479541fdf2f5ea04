"""Freshness: warn when the lake stops moving.

- bronze_events: a freshness check (last landing within an hour), evaluated by the
  `check_freshness` job (by hand or scheduled) and by the freshness sensor; never part of the
  jobs that build assets, whose runs would evaluate it before the landing they are about to do.
- silver_events: a freshness policy on the asset (lakehouse/assets.py), which the UI and the
  daemon track; a check there would be selected into every command-line backfill of silver
  and judged before the backfill materialized anything.
"""

from datetime import timedelta

import dagster as dg

from easymlops_assets.defs.lakehouse.assets import bronze_events

# Landing runs every few minutes when the Kafka sensors are on; an hour without one means the
# sensors, the daemon or the broker stopped.
FRESHNESS_CHECKS = dg.build_last_update_freshness_checks(
    assets=[bronze_events], lower_bound_delta=timedelta(hours=1)
)

freshness_checks_sensor = dg.build_sensor_for_freshness_checks(
    freshness_checks=FRESHNESS_CHECKS, minimum_interval_seconds=600
)
