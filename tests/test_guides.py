"""Runs the example code of the guides, each in a fresh process."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_python_block(guide):
    with open(os.path.join(ROOT, "docs", guide), encoding="utf-8") as f:
        return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


def run(code, cwd):
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compute_summary_guide_runs_and_its_numbers_agree(tmp_path):
    out = run(first_python_block("compute-summary.md"), tmp_path)
    assert out.count("Compute of \"gated_mlp\"") == 2
    logged = float(re.search(r"val_conditional_macs: (\d+)", out).group(1))
    profiled, speedup = map(float, out.strip().splitlines()[-1].split())
    # evaluate's logged MACs are the profile's, measured on the same data.
    assert abs(logged - profiled) <= 0.5
    dense = float(re.search(r"Dense MACs: ([\d,]+)", out).group(1).replace(",", ""))
    assert abs(speedup - dense / profiled) < 1e-9


def test_multiple_devices_guide_runs_on_two_replicas(tmp_path):
    out = run(first_python_block("multiple-devices.md"), tmp_path)
    assert "replicas: 2" in out and "val_conditional_macs" in out
