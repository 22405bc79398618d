"""Every result the READMEs cite is in a committed results file (benchmarks/check_claims.py), and the checker
reports a number that is not."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import check_claims  # noqa: E402

RESULTS = {"rows": {"teacher": {"dice_mean": 0.97173, "dice_std": 0.00064, "per_seed": {"0": {"dice": 0.9722}}},
                    "student": {"dice_mean": 0.94610, "dice_std": 0.00111, "per_seed": {"0": {"dice": 0.9457}}}},
           "speedup": 1.9485}
OTHER = {"rows": {"student": {"dice_mean": 0.9353}}}
README = """# A tool

## Reproduce

Trained for 40 epochs at `--lr 0.001`, 128 px, version 2.14 (results: run.json):
teacher 0.9717 ± 0.0006, student 0.9461 ± 0.0011, student / teacher 0.9461 / 0.9717 = 0.974,
-0.0256 (0.9461 vs 0.9717) below it, 1.95x faster; seed 0: 0.9722 and 0.9457.

## Another student (results: other.json)

It scored 0.9353.
"""


def _checkout(root: Path, readme: str, results: dict = RESULTS) -> Path:
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "run.json").write_text(json.dumps(results), encoding="utf-8")
    (root / "benchmarks" / "results" / "other.json").write_text(json.dumps(OTHER), encoding="utf-8")
    (root / "README.md").write_text(readme, encoding="utf-8")
    (root / "benchmarks" / "README.md").write_text("# Benchmarks\n\nNo results here (1,000 cases, 0.5 s).\n",
                                                    encoding="utf-8")
    return root


def test_the_committed_readmes_cite_only_committed_results():
    problems, summary = check_claims.check()
    assert not problems, "\n".join(problems)
    assert "0 to any results file" in summary  # every section with results names its files


def test_a_readme_matching_its_results_passes(tmp_path):
    problems, summary = check_claims.check(_checkout(tmp_path, README))
    assert not problems, problems
    # the settings (40, 0.001 in code, 128, 2.14) are not read as results; the 14 cited numbers are
    assert summary.startswith("check_claims: 14 cited numbers: 14 traced to the files their section names")


@pytest.mark.parametrize(("old", "new", "reported"), [
    ("student 0.9461 ±", "student 0.9471 ±", "README.md:6: 0.9471 (score)"),  # a score 0.001 off
    ("0.9722 and", "0.9732 and", "README.md:7: 0.9732 (score)"),  # a per-seed score 0.001 off
    ("= 0.974,", "= 0.964,", "README.md:6: 0.964 (worked out)"),  # a quotient worked out wrong
    ("-0.0256 (0.9461", "-0.0266 (0.9461", "README.md:7: -0.0266 (worked out)"),  # a difference worked out wrong
    ("1.95x", "1.85x", "README.md:7: 1.85x (ratio)"),
    # in a results file, but not in the one its section names (the next section's)
    ("student 0.9461 ±", "student 0.9353 ±", "README.md:6: 0.9353 (score) not in run.json"),
    ("scored 0.9353", "scored 0.9461", "README.md:11: 0.9461 (score) not in other.json"),
])
def test_a_wrong_number_is_reported_with_its_line(tmp_path, old, new, reported):
    assert README.count(old) == 1
    problems, _ = check_claims.check(_checkout(tmp_path, README.replace(old, new)))
    assert len(problems) == 1 and problems[0].startswith(reported), problems


def test_a_result_that_changed_is_reported(tmp_path):
    rerun = json.loads(json.dumps(RESULTS))
    rerun["rows"]["student"]["dice_mean"] = 0.9451
    problems, _ = check_claims.check(_checkout(tmp_path, README, rerun))
    # the student's score, cited three times (on its own and as an operand of the two worked-out numbers)
    assert [p.split(" (")[0] for p in problems] == ["README.md:6: 0.9461"] * 2 + ["README.md:7: 0.9461"]


def test_a_section_naming_a_missing_file_fails(tmp_path):
    with pytest.raises(SystemExit, match="nope.json"):
        check_claims.check(_checkout(tmp_path, README.replace("run.json", "nope.json")))
