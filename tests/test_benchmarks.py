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
