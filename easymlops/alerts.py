"""Alerts: always logged, and posted as JSON to `EASYMLOPS_ALERT_WEBHOOK_URL` when it is set (a
Slack/Teams/Mattermost incoming webhook, or anything that accepts a POST; `text` is what chat
webhooks display). A webhook that is down is logged, never raised: an alert must not fail the
sensor that sends it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from easymlops.settings import Settings

log = logging.getLogger(__name__)


def send(settings: Settings, title: str, details: Mapping[str, Any]) -> bool:
    """Log the alert and post it to the webhook; True if the webhook accepted it."""
    lines = [title, *(f"- {key}: {value}" for key, value in details.items())]
    text = "\n".join(lines)
    log.error("ALERT %s", text)
    if not settings.alert_webhook_url:
        return False
    import httpx  # only when a webhook is configured (the Dagster definitions import this module)

    try:
        response = httpx.post(
            settings.alert_webhook_url,
            json={"title": title, "text": text, "details": dict(details)},
            timeout=10,
        )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        log.warning("alert webhook %s failed: %s", settings.alert_webhook_url, exc)
        return False
    return True
