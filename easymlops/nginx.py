"""NGINX in front of Ray Serve: infra/nginx/nginx.conf.template rendered for a stack, checked with
`nginx -t`, and the command line that runs it (started by easymlops.stack, `up --with-nginx`)."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

from easymlops.settings import Settings

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "nginx" / "nginx.conf.template"
#: nginx's own liveness endpoint (Serve's are under /-/ too); it never reaches the upstream.
HEALTH_PATH = "/-/nginx-healthz"
# Where Debian puts the binary; /usr/sbin is not on every user's PATH.
_DEBIAN_BINARY = Path("/usr/sbin/nginx")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# host:port, host a name, an IPv4 address or a bracketed IPv6 address: nothing that could end
# the `server` directive and add others.
_UPSTREAM = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
# "2026/01/01 10:00:00 [emerg] 123#123: " before what nginx says.
_LOG_PREFIX = re.compile(r"^.*?\[(emerg|alert|crit|error)\] [0-9]+#[0-9]+: ")


class NginxError(RuntimeError):
    """The config cannot be rendered or nginx rejects it; the message says why."""


def binary() -> Path:
    found = shutil.which("nginx")
    if found:
        return Path(found)
    if os.access(_DEBIAN_BINARY, os.X_OK):
        return _DEBIAN_BINARY
    raise NginxError(
        "nginx is not installed: run `make serve-nginx` (installs Debian's nginx-light) "
        "or `apt-get install nginx-light`"
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def health_url(settings: Settings) -> str:
    return f"http://{_address(settings.host, settings.nginx_port)}{HEALTH_PATH}"


def url(settings: Settings) -> str:
    return f"http://{_address(settings.host, settings.nginx_port)}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _path(path: Path) -> str:
    """An absolute path as the template quotes it; characters nginx would read as a variable,
    an escape or the end of the string are refused rather than escaped."""
    # Absolute but not resolved: /dev/stdout must stay /dev/stdout, not the renderer's
    # /proc/self/fd/1 (the compose file renders the config in another container).
    text = str(path if path.is_absolute() else path.resolve())
    if any(char in text for char in '"$\\\n'):
        raise NginxError(f"path {text!r} contains a character nginx cannot take in a config")
    return text


def _user_directive() -> str:
    """Workers run as the user running the stack. Only root's master switches users (to
    `nobody` by default, who could not reach the stack home), so only then is it named."""
    if os.geteuid() != 0:
        return "# not root: the workers run as the user who started the master"
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def render(settings: Settings, data_dir: Path, access_log: Path) -> str:
    """The config for `settings`: listen on listen_host:nginx_port, proxy to serve_url, plus the
    backup upstream when one is set. Raises NginxError for a value that does not fit."""
    # Loopback unless EASYMLOPS_BIND_HOST asks otherwise, as in a container whose published
    # port decides who can connect: a stray EASYMLOPS_HOST must not open nginx to the network.
    if not settings.bind_host and not _loopback(settings.host):
        raise NginxError(
            f"nginx listens on loopback only, and EASYMLOPS_HOST is {settings.host!r} "
            "(set EASYMLOPS_BIND_HOST to bind elsewhere on purpose)"
        )
    backup = settings.nginx_backup_upstream.strip()
    if backup and not _UPSTREAM.fullmatch(backup):
        raise NginxError(f"EASYMLOPS_NGINX_BACKUP_UPSTREAM must be host:port, not {backup!r}")
    primary = _address(settings.host, settings.serve_port)
    values = {
        "user": _user_directive(),
        "data_dir": _path(data_dir),
        "access_log": _path(access_log),
        "listen": _address(settings.listen_host, settings.nginx_port),
        "primary": primary,
        # Used only while the primary is out (after a failure, for fail_timeout).
        "backup": f"server {backup} backup;" if backup else "# no backup upstream",
        "keepalive": str(settings.nginx_upstream_keepalive),
        "max_body_bytes": str(settings.serve_max_body_bytes),
        "rate_per_second": str(settings.nginx_rate_per_second),
        "rate_burst": str(settings.nginx_rate_burst),
        "health_path": HEALTH_PATH,
    }
    template = TEMPLATE.read_text()
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise NginxError(f"{TEMPLATE} has placeholders without a value: {', '.join(unknown)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def prepare(settings: Settings, data_dir: Path, access_log: Path) -> list[str]:
    """Write the config into `data_dir`, check it with `nginx -t` and return the command that
    runs it in the foreground. Raises NginxError naming the cause (nginx's own words)."""
    nginx = binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    access_log.parent.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nginx.conf"
    conf.write_text(render(settings, data_dir, access_log))
    # -e: the error log before the config is read, which would be /var/log/nginx otherwise.
    argv = [str(nginx), "-p", f"{data_dir}/", "-e", "stderr", "-c", str(conf)]
    try:
        checked = subprocess.run(
            [*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NginxError(f"`{nginx} -t` failed: {exc}") from None
    if checked.returncode != 0:
        lines = [
            _LOG_PREFIX.sub("", line)
            for line in checked.stderr.splitlines()
            if _LOG_PREFIX.match(line)
        ]
        reason = "; ".join(lines or checked.stderr.splitlines()[-3:]) or "no output"
        raise NginxError(f"`nginx -t` rejected {conf}: {reason}")
    return argv


def main(argv: list[str] | None = None) -> None:
    """`python -m easymlops.nginx --output FILE`: render the config for the EASYMLOPS_*
    environment without checking it (the renderer need not have nginx; docker-compose.yml's
    nginx-config job writes it for the nginx container, which checks it when it starts)."""
    import argparse

    from easymlops.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m easymlops.nginx", description=main.__doc__)
    parser.add_argument("--output", type=Path, required=True, help="where to write nginx.conf")
    parser.add_argument("--data-dir", type=Path, required=True, help="nginx's pid and temp files")
    parser.add_argument("--access-log", type=Path, required=True, help="e.g. /dev/stdout")
    args = parser.parse_args(argv)
    try:
        text = render(get_settings(), args.data_dir, args.access_log)
    except NginxError as exc:
        raise SystemExit(f"nginx config: {exc}") from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
