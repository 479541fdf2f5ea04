"""The services of the local stack, one module each; `registry()` collects their `SERVICES`.

Adding a service is adding a module here that defines `SERVICES: tuple[Spec, ...]`: the
registry imports every module of this package (but the supervisor), so nothing else is edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from easymlops.services.supervisor import Profile, Spec, StackError

__all__ = ["by_profile", "registry"]


@lru_cache(maxsize=1)
def registry() -> dict[str, Spec]:
    """Every service spec of the package by name, in rank order (start and report order).

    One dict for the process: callers (and tests) may replace an entry and the supervisor sees
    it."""
    found: dict[str, Spec] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "supervisor":
            continue
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for spec in getattr(loaded, "SERVICES", ()):
            if spec.name in found:
                raise StackError(f"service {spec.name!r} is defined twice ({module.name})")
            found[spec.name] = spec
    return dict(sorted(found.items(), key=lambda item: (item[1].rank, item[0])))


def by_profile(profile: Profile) -> list[str]:
    """The services `up --profile <profile>` starts (and `status` reports), in rank order;
    observed-only services (Ray Serve) are included, `up` skips them."""
    return [name for name, spec in registry().items() if profile in spec.profiles]
