"""Test support: broker and agent launchers, fixtures, model zoo and attack kits, loaded by tests/conftest.py."""
