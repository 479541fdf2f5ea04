"""NGINX in front of Ray Serve (easymlops.nginx renders and checks its config); only on request,
`up --with-nginx`."""

from __future__ import annotations

from easymlops import nginx
from easymlops.services.supervisor import Launch, Spec, StackError, data_dir, http_ok, log_path
from easymlops.settings import Settings


def _launch(settings: Settings) -> Launch:
    # Rendered and checked with `nginx -t` here, before `up` starts anything.
    try:
        argv = nginx.prepare(
            settings, data_dir(settings, "nginx"), log_path(settings, "nginx-access")
        )
    except nginx.NginxError as exc:
        raise StackError(f"nginx: {exc}") from None
    return Launch(argv)


def _health(settings: Settings) -> str | None:
    # nginx's own endpoint: Serve is deployed later, so /healthz through nginx may not answer yet.
    return http_ok(nginx.health_url(settings), timeout=2.0)


SERVICES = (
    Spec(
        name="nginx",
        rank=80,
        url=nginx.url,
        health=_health,
        launch=_launch,
        port_fields=lambda _s: ("nginx_port",),
        profiles=frozenset(),
        links=lambda s: {"upstream": s.serve_url},
        start_timeout=30.0,
        stop_grace=5.0,
    ),
)
