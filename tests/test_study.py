"""The momentum study script runs end to end at a tiny size and writes its table and plots."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_momentum_study_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "experiments/momentum_study.py", "--small", "--epochs=2",
         "--steps_per_epoch=4", "--probe_every=1", f"--out={tmp_path}",
         "--methods=MoCo v2,Projector-only EMA"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["MoCo v2", "Projector-only EMA"]
    for r in results.values():
        assert 0.0 <= r["knn_top1"] <= 1.0 and r["images_per_sec"] > 0
        assert [e["epoch"] for e in r["knn_per_epoch"]] == [1, 2]
        # One fluctuation value per block: the stem, 8 ResNet-18 blocks and the projector output.
        assert r["blocks"][0] == "relu" and r["blocks"][-1] == "projector" and len(r["blocks"]) == 10
        assert all(v >= 0 for v in r["fluctuation"].values()) and len(r["fluctuation"]) == 10
    assert "| MoCo v2 |" in (tmp_path / "results.md").read_text()
    for png in ("knn.png", "fluctuation.png"):
        assert (tmp_path / png).stat().st_size > 1000
