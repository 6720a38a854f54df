"""The test kit (`edgefleet.testing`) ships in the package; importing any of it imports no TensorFlow, so
a test or benchmark process that serves with tflite-runtime or LiteRT can use it. (That nothing in the
package imports the kit is checked with the other layers, in test_layers.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import edgefleet.testing

KIT = Path(edgefleet.testing.__file__).resolve().parent
KIT_MODULES = sorted(f"edgefleet.testing.{p.stem}" for p in KIT.glob("*.py") if p.stem != "__init__")

IMPORT_ALL = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "edgefleet"))))
"""


def test_importing_every_kit_module_imports_no_tensorflow() -> None:
    assert {"edgefleet.testing.broker", "edgefleet.testing.agentproc", "edgefleet.testing.faults",
            "edgefleet.testing.zoo"} <= set(KIT_MODULES)
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL, *KIT_MODULES], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout)
    assert set(KIT_MODULES) <= set(loaded)
    assert not [m for m in loaded if m.split(".")[0] in ("tensorflow", "keras")]
