"""The Dagster home files the production-local services share: `up` prepares the webserver and
the daemon in two threads of one process at once, and neither may lose the other's write."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from easymlops.services import dagster
from easymlops.settings import Settings


def test_concurrent_prepares_each_write_the_home_whole(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, dagster_grpc_port=41000)
    with ThreadPoolExecutor(8) as pool:
        # list() re-raises what any prepare raised (FileNotFoundError with a per-process name).
        list(pool.map(lambda _: dagster._write_home(settings), range(400)))
    folder = dagster.home(settings)
    workspace = json.loads((folder / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["port"] == 41000
    assert (folder / "dagster.yaml").read_text() == dagster.TEMPLATE.read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["dagster.yaml", "workspace.yaml"]
