"""The suite's fixtures live in tests/support/ and are loaded here as plugins:
`fixtures` (the model zoo, bundles, per-test host state), `broker` (Mosquitto brokers of every kind)
and `engines` (NATS, a NATS cluster, amqtt, and `engine`: one test run on each engine).

The launchers, the fault and soak runs they wrap are the package's test kit (`edgefleet.testing`,
shared with bench/); its asserts are rewritten as a test's are, so a failing scenario says why.
Every test is marked by its folder: `pytest -m unit` runs the fast ones (one process, no broker),
`-m integration` the ones against a real Mosquitto, `-m e2e` the ones with real agent processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("edgefleet.testing")

pytest_plugins = ["tests.support.fixtures", "tests.support.broker", "tests.support.engines"]

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    # the zoo and other built models are cached in the checkout (.cache/, ignored by git) for the suite
    from edgefleet.testing.reliability import CACHE_ENV

    os.environ.setdefault(CACHE_ENV, str(TESTS.parent / ".cache"))
    # edgectl's connection settings come from the tests alone, never from the developer's profile or variables
    from edgefleet.converter.fleet.profiles import ENV_PROFILE, SETTINGS

    os.environ["XDG_CONFIG_HOME"] = str(TESTS.parent / ".cache" / "xdg-config")
    # a collector without --db writes the default history file: the suite's, never the developer's
    os.environ["XDG_DATA_HOME"] = str(TESTS.parent / ".cache" / "xdg-data")
    for name in (ENV_PROFILE, *(s.env for s in SETTINGS)):
        os.environ.pop(name, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        if folder in LAYERS:
            item.add_marker(getattr(pytest.mark, folder))
