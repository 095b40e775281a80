"""Examples run as a user runs them: in a subprocess, from a clean working directory."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_writes_files_and_a_grid_where_loras_change_the_image(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "a.safetensors").stat().st_size > 0 and (tmp_path / "b.safetensors").stat().st_size > 0
    grid = np.asarray(Image.open(tmp_path / "quickstart.png")).astype(float)
    assert grid.shape == (64, 256, 3)
    base, a, b, blend = (grid[:, i * 64:(i + 1) * 64] for i in range(4))
    assert np.abs(a - base).mean() > 1 and np.abs(b - base).mean() > 1 and np.abs(a - b).mean() > 1
