import json
import sys
from pathlib import Path

from conftest import shared_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_segmentation_benchmark_quick_smoke(tmp_path):
    shared_dataset("cxr_lungs")
    import segmentation_transfer

    root = Path(__file__).resolve().parents[1]
    result = segmentation_transfer.main(["--config", str(root / "configs/benchmarks/cxr_lungs.yaml"), "--quick",
                                         "--max-cases", "4", "--work", str(tmp_path / "work"),
                                         "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "cxr_lungs.json").read_text())
    assert written["mode"] == "quick" and written["seeds"] == [0]
    rows = written["rows"]
    # teachers, single-teacher students, fused, fine-tuned, baselines (quick mode skips the variants)
    assert len(rows) == 3 + 3 + 4 + 1 + 3
    for row, entry in rows.items():
        assert 0.0 <= entry["dice_mean"] <= 1.0, row
    assert "labels vs transferal truth" in (tmp_path / "out" / "cxr_lungs.md").read_text()
    assert result["rows"].keys() == rows.keys()


def test_classification_benchmark_quick_smoke_and_resume(tmp_path):
    shared_dataset("kermany_cxr")
    import classification_transfer

    root = Path(__file__).resolve().parents[1]
    argv = ["--config", str(root / "configs/benchmarks/kermany_cxr.yaml"), "--quick", "--max-images", "8",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    result = classification_transfer.main(argv)
    rows = result["rows"]
    # 3 teachers; per budget scratch, transfer learning, KD from one and from three teachers, RoS-KD; 2 noise rows
    assert len(rows) == 3 + 5 + 2
    attacked = [row for row, entry in rows.items() if "pgd_accuracy_mean" in entry]
    assert len(attacked) == 3  # the plain, the single-teacher KD and the RoS-KD students
    for row, entry in rows.items():
        assert 0.0 <= entry["accuracy_mean"] <= 1.0, row
    assert json.loads((tmp_path / "out" / "kermany_cxr.json").read_text())["rows"] == json.loads(json.dumps(rows))

    weights = tmp_path / "work" / "seed0" / "teacher0" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    resumed = classification_transfer.main([*argv, "--resume"])  # the finished seed is read back, not retrained
    assert resumed["rows"] == rows and weights.stat().st_mtime_ns == trained_at
