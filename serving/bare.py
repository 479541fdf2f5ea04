"""The serving app without Ray Serve: the same `Predictor` and `build_app` (same code, same Redis,
same champion booster) under plain uvicorn. It is the baseline of benchmarks/serving.py, which
compares Serve against it; it is not a deployment path of the platform.

    python -m serving.bare --port 18100
"""

from __future__ import annotations

import argparse

import uvicorn

from easymlops.settings import get_settings
from serving.app import Predictor, build_app
from serving.model import ServingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--poll-interval", type=float, default=10.0)
    args = parser.parse_args()
    settings = get_settings()
    predictor = Predictor(
        ServingConfig.from_settings(settings, poll_interval_s=args.poll_interval), "bare"
    )
    try:
        # One worker, one event loop, no access log: what a Serve replica runs per request.
        uvicorn.run(
            build_app(predictor),
            host=settings.listen_host,
            port=args.port,
            access_log=False,
            log_level="warning",
        )
    finally:
        predictor.close()


if __name__ == "__main__":
    main()
