"""`edgectl` on a machine without TensorFlow (a board, a CI runner): convert says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TF = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras'):
            raise ModuleNotFoundError(f'No module named {name!r}')
sys.meta_path.insert(0, Block())
from edgefleet.converter.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_convert_without_tensorflow_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "model.keras"
    src.write_bytes(b"not really a model")
    res = subprocess.run([sys.executable, "-c", WITHOUT_TF, "convert", str(src), "-o", str(tmp_path / "b")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("edgectl: error: TensorFlow is not installed")
    assert "pip install 'edgefleet[converter]'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
