"""benchmarks/time_to_quality.py --dry-run: the benchmark's whole code path (our pretraining to a
time budget, the transformers baseline, both scored on the same validation documents) on a few
hundred documents, so that the script behind the README's time-to-quality table cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytest.importorskip("snownlp")
pytest.importorskip("transformers")


def test_time_to_quality_dry_run_scores_both_models_on_the_same_documents(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), "--out", str(tmp_path),
                             "--dry-run", "--set", "model.vocab_size=1000"],
                            env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, baseline = json.loads((tmp_path / "results-both.json").read_text(encoding="utf-8"))
    assert ours["name"].startswith("babyllama") and "GPT-2" in baseline["name"]
    assert ours["val_chars"] == baseline["val_chars"] > 0  # the same validation documents
    for r in (ours, baseline):
        assert math.isfinite(r["bpc"]) and 0 < r["bpc"] < 20
        assert r["steps"] > 0 and r["curve"]
        assert r["seconds"] < 60  # the dry run's 6-second budget ended the training
    assert "ours / baseline bits per character" in result.stdout
    assert "| babyllama demo-preset |" in result.stdout


def test_curve_is_read_between_the_evaluations_around_each_mark():
    spec = importlib.util.spec_from_file_location("time_to_quality", REPO / "benchmarks" / "time_to_quality.py")
    ttq = importlib.util.module_from_spec(spec)
    sys.modules["time_to_quality"] = ttq  # dataclasses look their module up there
    spec.loader.exec_module(ttq)
    curve = [(71.0, 6.6), (142.0, 6.2), (600.0, 5.4)]
    assert ttq.at_minutes(curve, 2) == pytest.approx(6.6 - 0.4 * 49 / 71)  # not the 71 s evaluation
    assert ttq.at_minutes(curve, 10) == pytest.approx(5.4)
    assert ttq.at_minutes(curve, 1) is None and ttq.at_minutes(curve, 11) is None
