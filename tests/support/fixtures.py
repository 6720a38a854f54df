"""Shared fixtures: the model zoo (the kit's, built once in a TensorFlow-only subprocess and cached) and bundles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.reliability import zoo_model


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], Path]:
    """Path of a zoo model by name (edgefleet/testing/zoo.py), building every model once per version of it."""
    return zoo_model


@pytest.fixture
def make_bundle(zoo: Callable[[str], Path], tmp_path: Path) -> Callable[..., Path]:
    """Write a bundle of a zoo model (``make_bundle("dense_f32", version=2, key=k)``) and return its path."""
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle

    counter = iter(range(1_000_000))

    def make(model: str = "dense_f32", *, name: str = "m", version: int = 1, key=None,  # type: ignore[no-untyped-def]
             samples: int = 4, out: Path | None = None, **spec_kwargs) -> Path:
        from edgefleet.runtime import load_model

        data = zoo(model).read_bytes()
        loaded = load_model(data)
        rng = np.random.default_rng(version)
        golden = []
        for s in loaded.inputs:
            shape = tuple(1 if d == -1 else d for d in s.shape)
            if s.dtype.startswith("int") or s.dtype.startswith("uint"):
                info = np.iinfo(np.dtype(s.dtype))
                golden.append(rng.integers(info.min, info.max, size=(samples, *shape), endpoint=True).astype(s.dtype))
            else:
                golden.append(rng.normal(size=(samples, *shape)).astype(s.dtype))
        dest = out or tmp_path / f"bundle-{model}-{name}-v{version}-{next(counter)}"
        write_bundle(dest, data, BundleSpec(name=name, version=version, golden_inputs=golden, **spec_kwargs), key=key)
        return dest

    return make


@pytest.fixture(autouse=True)
def host_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own EDGEFLEET_STATE_DIR: what edgectl remembers (the newest inventory seen) stays in it."""
    path = tmp_path_factory.mktemp("edgectl-state")
    monkeypatch.setenv("EDGEFLEET_STATE_DIR", str(path))
    return path



@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test starts and appends here; stopped after it."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()
