"""Test support: fixtures, the shipped broker config, fakes, fuzzing strategies and model builders, loaded
by tests/conftest.py. The launchers and fault runs the tests share with bench/ are the package's test kit,
`edgefleet.testing`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository checkout the suite runs from."""
