"""`easymlops up|down|status` on top of easymlops.services: which services a call acts on.

The supervisor (easymlops/services/supervisor.py) starts, watches and stops processes; each
service is a module of easymlops/services/. This module picks the set: `up` starts the services
of `settings.profile` ("embedded" or "production-local"), plus the optional ones asked for by
name (nginx, the Flink cluster); `down` stops whatever this home has running; `status` reports
the profile's services and any other that was started here.
"""

from __future__ import annotations

from collections.abc import Sequence

from easymlops.services import by_profile, registry
from easymlops.services import supervisor as _supervisor
from easymlops.services.flink import NAMES as FLINK
from easymlops.services.flink import flink_data_dir
from easymlops.services.supervisor import (
    Launch as _Launch,
)
from easymlops.services.supervisor import (
    Profile,
    Progress,
    ServiceStatus,
    Spec,
    StackError,
    State,
    free_port,
    log_path,
    log_tail,
)
from easymlops.settings import Settings

__all__ = [
    "FLINK",
    "MANAGED",
    "OPTIONAL",
    "SERVICES",
    "ServiceStatus",
    "StackError",
    "State",
    "_Launch",
    "down",
    "flink_data_dir",
    "free_port",
    "log_path",
    "log_tail",
    "profile_services",
    "status",
    "up",
]

#: Every service spec by name; one dict for the process, so a test may replace an entry.
_SPECS: dict[str, Spec] = registry()


def _startable(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for name in names if not _SPECS[name].observed())


#: Services `up` starts by default (the embedded profile), in start/report order.
MANAGED: tuple[str, ...] = _startable(by_profile("embedded"))
#: Services `up` starts only when asked by name; `down` stops them, `status` reports them once
#: started.
OPTIONAL: tuple[str, ...] = tuple(
    name for name, spec in _SPECS.items() if not spec.profiles and not spec.observed()
)
#: What `status` reports for the embedded profile: MANAGED plus Ray Serve, which the serving
#: code deploys on the Ray head later and the stack only observes.
SERVICES: tuple[str, ...] = tuple(by_profile("embedded"))


def profile_services(profile: Profile) -> list[str]:
    """The services `up` starts for a profile, in start order."""
    return list(_startable(by_profile(profile)))


def _select(services: Sequence[str], allowed: Sequence[str]) -> list[str]:
    unknown = [name for name in services if name not in allowed]
    if unknown:
        raise StackError(
            f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return [name for name in allowed if name in services]


def up(
    settings: Settings,
    *,
    services: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[ServiceStatus]:
    """Start the services of `settings.profile` (or the given ones) and wait until they are
    healthy; optional services (nginx, Flink) start only when named in `services`.

    Idempotent: services already running and healthy are left alone. External services
    (non-empty kafka_bootstrap / redis_url / mlflow_tracking_uri / ray_address) are only
    health-checked. Raises StackError naming the service and the cause."""
    if services is None:
        names = profile_services(settings.profile)
    else:
        names = _select(services, _startable(list(_SPECS)))
    return _supervisor.up(settings, [_SPECS[name] for name in names], progress=progress)


def down(
    settings: Settings,
    *,
    services: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Stop what `up` started in this home (all of it, whatever the profile, or the given
    services) and return the names of the services stopped."""
    allowed = _startable(list(_SPECS))
    names = list(allowed) if services is None else _select(services, allowed)
    return _supervisor.down(settings, [_SPECS[name] for name in names], progress=progress)


def status(settings: Settings, *, services: Sequence[str] | None = None) -> list[ServiceStatus]:
    """Report each service without changing anything: by default those of `settings.profile`
    (Ray Serve included) plus any other started in this home."""
    if services is None:
        wanted = set(by_profile(settings.profile)) | set(_supervisor.recorded(settings, _SPECS))
        names = [name for name in _SPECS if name in wanted]
    else:
        names = _select(services, list(_SPECS))
    return _supervisor.status(settings, [_SPECS[name] for name in names])
