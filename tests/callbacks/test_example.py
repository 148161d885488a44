import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schedules_and_monitoring_example_runs(tmp_path, capsys):
    path = os.path.join(ROOT, "examples", "schedules_and_monitoring.py")
    spec = importlib.util.spec_from_file_location("schedules_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(
        ["--epochs", "2", "--warmup-epochs", "1", "--units", "32", "--blocks", "4",
         "--out", str(tmp_path)]
    ).history
    assert history["policy_enabled"] == [0.0, 1.0]
    # The warm-up validates with every block; the monitor measures as predict does.
    assert history["val_density"][0] == 1.0
    assert 0 <= history["inference_density"][0] <= 1
    assert os.path.exists(tmp_path / "compute.png")
    assert os.listdir(tmp_path / "logs" / "compute")
    assert "inference density on the test set" in capsys.readouterr().out
