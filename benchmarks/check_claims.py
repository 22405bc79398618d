"""Check that every result README.md and benchmarks/README.md cite is in a committed results file.

The numbers checked (outside code blocks and `code spans`; all others, such as integers, sizes, epochs, one- or
two-decimal numbers, percentages and versions, are not read as results):
- scores: unsigned decimals in [0, 1] with 3 or 4 decimals (Dice, AUC, kappa, a ± spread: 0.9472, 0.947);
- differences: the same with a sign (+0.0046, -0.029), or unsigned after "by", "adds" or "within" or before
  "below", "less", "more", "higher" or "lower" (optionally with "Dice" between: "0.026 Dice below");
- ratios: a number with 2 decimals followed by x (1.95x).

Where a claim names its source: a section of a README (from one heading to the next) names its results files as
``(results: drive_recipe.json, fusion_ceiling/*.json)`` (paths under benchmarks/results/, globs allowed), and its
numbers are looked up in those files alone. A section that names none is checked against every committed
results file (counted as the fallback in the summary).

A number is traced when:
- a score equals a number of the files at its cited rounding (within half a unit of its last decimal);
- a ratio equals a number of the files, or a / b for two numbers whose places in the files differ in one key only
  (the same key of two rows, of two seeds, or of one row in two files; never a mean and its std);
- a difference written out, ``A - B = C`` or ``C (A vs B`` (or ``against``), or a quotient ``A / B = C``, has C
  equal to A - B or A / B at C's rounding (A and B are checked as scores);
- any other difference equals a - b for two such numbers, raw or rounded as cited. This check is loose: a
  results file holds a pair for almost any 4-decimal difference, so write the operands out wherever a
  difference matters; the summary counts the loose ones;
- it is in ALLOWED, with the reason it has no results file.

    python benchmarks/check_claims.py    # one line per untraced number and exit status 1, or a summary and 0
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/README.md")
RESULTS = "benchmarks/results"
# (README, why these numbers have no results file, the numbers as cited). Keep it short: fix the README instead
# wherever a results file exists.
ALLOWED: list[tuple[str, str, tuple[str, ...]]] = [
    ("benchmarks/README.md", "claims table: the student / teacher quotients worked out in the cxr_lungs section",
     ("0.974", "0.998")),
    ("benchmarks/README.md", "noisy-student rows' retrained teachers: printed in that session's log, before the "
     "results files kept `retrained_dice`", ("0.013",)),
    ("benchmarks/README.md", "fusion_ceiling.py's label-free rules on drive seed 0 and busi seed 2 (--step 0.5): "
     "those runs' JSON files were not kept, as the README says",
     ("0.7786", "0.7810", "0.7754", "0.4854", "0.4779", "0.3860", "0.4582", "-0.0017", "-0.142")),
    ("benchmarks/README.md", "brats6 tumour-slice Dice (nonempty_dice.py), read from a work folder a later quick "
     "run overwrote; never written to a results file",
     ("0.1913", "0.0224", "0.1222", "0.1059", "0.1399", "0.0159", "0.0995", "0.0456", "0.0567", "0.0518", "0.0273",
      "0.0536", "0.0374", "0.0093", "0.0885", "0.2434", "0.0000")),
    ("benchmarks/README.md", "eyepacs_dr seed-0 teacher retrained by hand with --balance-classes; no results file",
     ("0.550", "0.524")),
]

NUMBER = re.compile(r"(?<![\w.])([+-]?)(\d+\.(\d+))(x?)(?!\w|\.\d)")
GAP_AFTER = re.compile(r"\s+(Dice\s+)?(below|less|more|higher|lower)\b")
GAP_BEFORE = re.compile(r"\b(by|adds|within)( about)?\s+$")
# C worked out from two cited scores: "A / B = C", "A - B = C", or "C (A vs B" / "C (A against B" for C = A - B
WORKED = re.compile(r"(?P<a>\d+\.\d+) (?P<op>[/-]) (?P<b>\d+\.\d+) = (?P<c>[+-]?\d+\.\d+)"
                    r"|(?P<d>[+-]\d+\.\d+),? \((?P<a2>\d+\.\d+) (vs|against) (?P<b2>\d+\.\d+)")
MARKER = re.compile(r"\(results:\s+([^)]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
EPS = 1e-9

Leaf = tuple[tuple, float]


def _leaves(node: object, path: tuple) -> Iterator[Leaf]:
    """Every number of a JSON document with its place: (file, key, key, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, float(node)


class Sources:
    """The numbers of some results files, their one-key differences and their one-key ratios, sorted."""

    def __init__(self, leaves: list[Leaf]) -> None:
        self.values = sorted(v for _, v in leaves)
        groups: dict[tuple, list[float]] = defaultdict(list)
        for path, v in leaves:  # numbers whose places differ only at position i share a group
            for i in range(len(path) - isinstance(path[-1], str)):  # never two keys of one place (mean vs std)
                groups[(len(path), i, path[:i] + path[i + 1:])].append(v)
        pairs = {(a, b) for g in groups.values() for a in g for b in g if a != b}
        self.diffs = sorted((a - b, a, b) for a, b in pairs)
        self.ratios = sorted(a / b for a, b in pairs if b)

    def has_difference(self, x: float, decimals: int) -> bool:
        unit = 10.0 ** -decimals
        lo = bisect.bisect_left(self.diffs, (x - unit - EPS,))
        for d, a, b in self.diffs[lo:bisect.bisect_right(self.diffs, (x + unit + EPS,))]:
            if abs(d - x) <= unit / 2 + EPS or abs(round(a, decimals) - round(b, decimals) - x) <= EPS:
                return True
        return False


def _worked(m: re.Match) -> tuple[int, float]:
    """(where C's digits start, the value A / B or A - B) for a WORKED match."""
    if m.group("c"):
        a, b = float(m.group("a")), float(m.group("b"))
        return m.start("c") + (m.group("c")[0] in "+-"), a / b if m.group("op") == "/" else a - b
    return m.start("d") + 1, float(m.group("a2")) - float(m.group("b2"))


def _near(ordered: list[float], x: float, tol: float) -> bool:
    i = bisect.bisect_left(ordered, x - tol - EPS)
    return i < len(ordered) and ordered[i] <= x + tol + EPS


def _sections(lines: list[str]) -> Iterator[tuple[list[str], list[tuple[int, str]]]]:
    """(results files named, [(line number, text without code)]) per section; code blocks left out."""
    body: list[tuple[int, str]] = []
    fenced = spanning = False  # in a code block; in a code span continued from the line before
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            yield _named(body), body
            body = [(number, line)]
        elif not fenced:
            text = CODE_SPAN.sub(lambda m: " " * len(m.group()), ("`" if spanning else "") + line)[spanning:]
            spanning = "`" in text
            body.append((number, text.split("`")[0]))
    yield _named(body), body


def _named(body: list[tuple[int, str]]) -> list[str]:
    """The results files a section names: ``(results: a.json, b.json)``, possibly over several lines."""
    text = "\n".join(t for _, t in body)
    return [n for m in MARKER.finditer(text) for n in re.split(r"[,\s]+", m.group(1)) if n]


def _resolve(results: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """The results files (relative to `results`) that the names match, and the names that match none."""
    found, missing = [], []
    for name in names:
        matched = sorted(p.relative_to(results).as_posix() for p in results.glob(name.removeprefix(RESULTS + "/")))
        found += matched
        if not matched:
            missing.append(name)
    return found, missing


class Claim(NamedTuple):
    """One cited number: where it is, what kind of result it is read as, and the files its section names."""

    readme: str
    line: int
    cited: str  # as written: "+0.0046", "0.947", "1.95x"
    kind: str  # "score", "difference", "ratio" or "worked out"
    value: float
    decimals: int
    files: tuple[str, ...]  # the section's results files; () for none named (every file is searched)
    worked: float | None  # C's value worked out from the cited A and B (see WORKED)
    context: str


def claims(root: Path = ROOT) -> Iterator[Claim]:
    """Every number the READMEs under `root` cite as a result (see the module docstring for which)."""
    results = root / RESULTS
    for readme in READMES:
        for names, body in _sections((root / readme).read_text(encoding="utf-8").splitlines()):
            files, missing = _resolve(results, names)
            if missing:
                raise SystemExit(f"{readme}:{body[0][0]}: (results: {', '.join(missing)}) names no file in {results}")
            for number, text in body:
                worked = dict(_worked(m) for m in WORKED.finditer(text))
                for m in NUMBER.finditer(text):
                    sign, cited, decimals, ratio = m.group(1), m.group(2), len(m.group(3)), m.group(4)
                    value = float(sign + cited)
                    if m.start(2) in worked:
                        kind = "worked out"
                    elif ratio and decimals == 2:
                        kind = "ratio"
                    elif ratio or decimals not in (3, 4) or abs(value) > 1:
                        continue
                    elif sign or GAP_AFTER.match(text, m.end()) or GAP_BEFORE.search(text, 0, m.start()):
                        kind = "difference"
                    else:
                        kind = "score"
                    context = text[max(0, m.start() - 50):m.end() + 30].strip()
                    yield Claim(readme, number, m.group(), kind, value, decimals, tuple(files),
                                worked.get(m.start(2)), context)


def traced(claim: Claim, src: Sources) -> bool:
    """Whether `src` (the files the claim's section names) holds the claim's number, as the docstring says."""
    tol = 0.5 * 10.0 ** -claim.decimals + EPS
    if claim.kind == "worked out":
        return abs(claim.worked - claim.value) <= tol
    if claim.kind == "difference":
        return src.has_difference(claim.value, claim.decimals)
    return _near(src.values, claim.value, tol) or claim.kind == "ratio" and _near(src.ratios, claim.value, tol)


def check(root: Path = ROOT) -> tuple[list[str], str]:
    """Untraced numbers of the READMEs under `root` (one line each: ``file:line: number ... context``) and a
    summary line."""
    results = root / RESULTS
    leaves = {p.relative_to(results).as_posix(): list(_leaves(json.loads(p.read_text(encoding="utf-8")), ()))
              for p in sorted(results.rglob("*.json"))}
    cache: dict[tuple[str, ...], Sources] = {}
    allowed = {(readme, number) for readme, _, numbers in ALLOWED for number in numbers}
    problems: list[str] = []
    counts: Counter[str] = Counter()
    for claim in claims(root):
        files = claim.files or tuple(leaves)
        if files not in cache:
            cache[files] = Sources([((f, *path), v) for f in files for path, v in leaves[f]])
        if traced(claim, cache[files]):
            counts["named" if claim.files else "fallback"] += 1
            counts[claim.kind] += 1
        elif (claim.readme, claim.cited) in allowed:
            counts["allowed"] += 1
        else:
            scope = ", ".join(claim.files) or "any results file"
            problems.append(f"{claim.readme}:{claim.line}: {claim.cited} ({claim.kind}) not in {scope}: "
                            f"...{claim.context}...")
    summary = (f"check_claims: {counts['named'] + counts['fallback'] + counts['allowed']} cited numbers: "
               f"{counts['named']} traced to the files their section names, {counts['fallback']} to any results "
               f"file (sections naming none), {counts['allowed']} allowed without a file. Traced: {counts['score']} "
               f"scores, {counts['worked out']} worked out from cited scores, {counts['ratio']} ratios and "
               f"{counts['difference']} differences checked only loosely (some pair of the files differs by them)")
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout holding the READMEs and results")
    problems, summary = check(parser.parse_args(argv).root)
    print("\n".join(problems) if problems else summary)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
