import os
import subprocess
import sys

from tests.test_data import fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bengio_mnist_example_runs(tmp_path, rng):
    fake_mnist(tmp_path, rng, compress=True)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "bengio_mnist.py"),
         "--data-dir", str(tmp_path), "--epochs", "1", "--sparsity-deviation", "squared"],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "condnet 16x16" in done.stdout and "dense 32" in done.stdout
    # Where no example samples a block (as on this fake data), "-", not nan.
    assert "nan" not in done.stdout, done.stdout
