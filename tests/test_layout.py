"""A checkout's package finds its kernels/ and bench/ (installed as selagg_fast.kernels / .bench)
beside it, so Python run from the repository root imports the checkout's kernels whatever is
installed (a non-editable install included)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "kernels" / "__init__.py").is_file(), reason="needs a source checkout")
def test_checkout_imports_its_own_kernels_and_bench(tmp_path):
    # a bare checkout: the package folder without kernels/ or bench/ inside it
    ignore = shutil.ignore_patterns("__pycache__", "kernels", "bench")
    shutil.copytree(ROOT / "selagg_fast", tmp_path / "selagg_fast", ignore=ignore)
    for name in ("kernels", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "out", "results"))
    code = ("import selagg_fast.kernels.attention as k, selagg_fast.bench.common as b, selagg_fast.ops.abmilp; "
            "print(k.__file__); print(b.__file__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels, bench = proc.stdout.split()
    assert Path(kernels) == tmp_path / "kernels" / "attention.py"
    assert Path(bench) == tmp_path / "bench" / "common.py"
