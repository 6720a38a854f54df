"""The suite's fixtures live in tests/support/ and are loaded here as plugins:
`fixtures` (the model zoo, bundles, per-test host state) and `broker` (Mosquitto brokers of every kind)."""

pytest_plugins = ["tests.support.fixtures", "tests.support.broker"]
