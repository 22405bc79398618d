"""Label spaces: which classes a teacher knows, by value and by name, and how they map onto one target space.

Every teacher declares its classes (``card.label_values``: the integers in mask files; ``card.class_names``:
names, from a run's card, nnU-Net's dataset.json, a bundle's metadata, an ONNX/TorchScript sidecar, or
``?labels=0:background,255:lesion`` / ``?classes=background,lesion`` on any spec). `unify` maps them onto one
target space, in this order of precedence:

1. an explicit mapping: ``?map=1:255`` on a spec, or ``--label-map FILE.yaml``::

       classes: {0: background, 1: liver, 2: spleen}   # the target space (value: name); optional
       map: {lesion: 255, 1: 255}                        # any teacher's class (value or name) -> target value or name
       teachers: {"nnunet:/models/ts": {3: 2}}           # one teacher's classes (by spec), before `map`

2. the same values (and no conflicting names): the teachers share the space as it is;
3. names, when every teacher names its classes: the union of the names (background = value 0 or "background");
4. values, when every teacher is binary with background 0: background + one foreground is unambiguous
   ({0, 1} and {0, 255} fuse); the target takes the values most teachers use.

Anything else is refused in one line that names both sides. A teacher that does not know a target class is
*partial*: fusion then uses, per class, only the teachers that know it (`nakt.fusion.fuse_partial`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import numpy as np

from nakt.config import read_yaml_mapping
from nakt.errors import NaktError

__all__ = ["LabelMap", "TeacherMapping", "Unified", "base_spec", "parse_labels", "parse_map", "read_label_map",
           "split_label_options", "unify"]

BACKGROUND = "background"
LABEL_OPTIONS = ("labels", "classes", "map")


@dataclass
class LabelMap:
    """A ``--label-map`` file: the target space (`classes`, value -> name), a global class map and per-teacher
    maps; keys and targets are values (int) or names (str)."""

    classes: dict[int, str] = field(default_factory=dict)
    map: dict = field(default_factory=dict)
    teachers: dict[str, dict] = field(default_factory=dict)


@dataclass
class TeacherMapping:
    """Where a teacher's own classes go: ``target_index[i]`` is the target class of its class ``i``."""

    spec: str
    own_values: list[int]
    target_index: list[int]
    by: str  # "identical", "map", "name" or "value"


@dataclass
class Unified:
    """The target space all teachers are mapped onto, and each teacher's mapping."""

    values: list[int]
    names: list[str]
    mappings: list[TeacherMapping]

    @property
    def known(self) -> np.ndarray:
        """``[K, C]`` bool: teacher k knows target class c."""
        known = np.zeros((len(self.mappings), len(self.values)), dtype=bool)
        for k, m in enumerate(self.mappings):
            known[k, m.target_index] = True
        return known

    @property
    def partial(self) -> bool:
        return not self.known.all()

    def record(self) -> dict:
        """The manifest's account of the mapping: per teacher, own value -> target value, and who knew what."""
        return {"by_teacher": [{"spec": m.spec, "by": m.by,
                                "classes": {str(own): self.values[t] for own, t in zip(m.own_values, m.target_index)}}
                               for m in self.mappings],
                "known_by": [int(n) for n in self.known.sum(0)]}

    def to_target(self, k: int, probs: np.ndarray) -> np.ndarray:
        """Teacher k's probabilities ``[C_k, *spatial]`` in the target's classes ``[C, *spatial]`` (zeros for the
        classes it does not know; two own classes mapped onto one target class add up)."""
        m = self.mappings[k]
        if m.target_index == list(range(len(self.values))):
            return probs
        out = np.zeros((len(self.values), *probs.shape[1:]), dtype=probs.dtype)
        for own, target in enumerate(m.target_index):  # a loop: np.add.at is unbuffered, slow on volumes
            out[target] += probs[own]
        return out


def split_label_options(spec: str) -> tuple[str, dict[str, str]]:
    """``"onnx:m.onnx?labels=0:bg,255:lesion&x=1"`` -> ``("onnx:m.onnx?x=1", {"labels": "0:bg,255:lesion"})``:
    the label-space options any spec takes, apart from those its own kind reads."""
    base, sep, query = spec.partition("?")
    if not sep:
        return spec, {}
    pairs = parse_qs(query, keep_blank_values=True)
    options = {k: v[-1] for k, v in pairs.items() if k in LABEL_OPTIONS}
    if not options:
        return spec, {}  # untouched: its own kind reads the query
    rest = urlencode([(k, v) for k, vs in pairs.items() if k not in LABEL_OPTIONS for v in vs], safe=",:/")
    return base + ("?" + rest if rest else ""), options


def base_spec(spec: str) -> str:
    """`spec` without its label-space options (`split_label_options`)."""
    return split_label_options(spec)[0]


def parse_labels(text: str, spec: str) -> tuple[list[int], list[str] | None]:
    """``"0:background,255:lesion"`` -> ``([0, 255], ["background", "lesion"])``; ``"0,1,2"`` -> values only."""
    values, names = [], []
    for item in filter(None, (s.strip() for s in text.split(","))):
        value, _, name = item.partition(":")
        try:
            values.append(int(value))
        except ValueError:
            raise NaktError(spec, f"?labels={text}: {value!r} is not a whole number",
                            "write VALUE:NAME pairs, e.g. ?labels=0:background,255:lesion") from None
        names.append(name.strip())
    if len(set(values)) != len(values):
        raise NaktError(spec, f"?labels={text} repeats a value")
    return values, (names if all(names) else None)


def parse_map(text: str, spec: str) -> dict:
    """``"1:255,tumour:lesion"`` -> ``{1: 255, "tumour": "lesion"}``."""
    pairs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        source, sep, target = item.partition(":")
        if not sep:
            raise NaktError(spec, f"?map={text}: {item!r} is not SOURCE:TARGET", "e.g. ?map=1:255")
        pairs[_key(source)] = _key(target)
    return pairs


def read_label_map(path: str | Path) -> LabelMap:
    """A ``--label-map`` YAML file (see the module docstring)."""
    path = Path(path)
    data = read_yaml_mapping(path, "label map", "a label map is a mapping with classes:, map: and teachers:")
    unknown = sorted(set(data) - {"classes", "map", "teachers"})
    if unknown:
        raise NaktError(path, f"unknown key {unknown[0]!r}", "valid: classes, map, teachers")
    try:
        classes = {int(v): str(n) for v, n in (data.get("classes") or {}).items()}
    except (TypeError, ValueError):
        raise NaktError(path, "classes: must map whole-number values to names, e.g. {0: background}") from None
    as_keys = lambda m: {_key(s): _key(t) for s, t in (m or {}).items()}  # noqa: E731
    return LabelMap(classes, as_keys(data.get("map")),
                    {str(spec): as_keys(m) for spec, m in (data.get("teachers") or {}).items()})


def _key(text) -> int | str:
    """A class given by value (a whole number) or by name."""
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        return text.lower()


def _named(values: list[int], names: list[str]) -> bool:
    """Whether a space names its classes (a card without names gets its values as names)."""
    return any(n != str(v) for v, n in zip(values, names))


def _is_background(value: int, name: str) -> bool:
    return name.lower() == BACKGROUND or (value == 0 and name.lower() in (BACKGROUND, "0", "bg"))


def unify(spaces: list[tuple[str, list[int], list[str]]], label_map: LabelMap | None = None,
          spec_maps: list[dict] | None = None) -> Unified:
    """Map every teacher's space ``(spec, values, names)`` onto one target space (see the module docstring).
    `spec_maps`: each teacher's ``?map=`` pairs."""
    label_map = label_map or LabelMap()
    spec_maps = spec_maps or [{} for _ in spaces]
    explicit = [{**label_map.teachers.get(spec, {}), **own} for (spec, _, _), own in zip(spaces, spec_maps)]
    if label_map.classes or label_map.map or any(explicit):
        unified = _by_map(spaces, label_map, explicit)
    elif all(sorted(v) == sorted(spaces[0][1]) for _, v, _ in spaces) and _names_agree(spaces):
        values = sorted(spaces[0][1])
        names = _names_for(values, spaces)
        unified = Unified(values, names, [TeacherMapping(s, list(v), [values.index(x) for x in v], "identical")
                                          for s, v, _ in spaces])
    elif all(_named(v, n) for _, v, n in spaces):
        unified = _by_name(spaces)
    elif all(len(v) == 2 and 0 in v for _, v, _ in spaces) and len(_foreground_names(spaces)) <= 1:
        unified = _binary(spaces)
    else:
        (a, va, na), (b, vb, nb) = _first_differing(spaces)
        raise NaktError(b, f"label values {_shown_space(vb, nb)} cannot be matched with {a}'s "
                        f"{_shown_space(va, na)} (not the same values, not named on every teacher, not one "
                        "foreground of one name each)",
                        "name the classes (?labels=0:background,1:liver on each spec) or map them (--label-map "
                        "FILE.yaml, or ?map=1:255)")
    return unified


def _shown_space(values: list[int], names: list[str]) -> str:
    """``[0, 255]``, or with names ``[0 background, 1 liver]``."""
    if not _named(values, names):
        return str(sorted(values))
    return "[" + ", ".join(f"{v} {n}" for v, n in sorted(zip(values, names))) + "]"


def _first_differing(spaces):
    """The first two teachers whose spaces cannot be matched as they are."""
    pairs = [(a, b) for i, a in enumerate(spaces) for b in spaces[i + 1:]]
    return next(((a, b) for a, b in pairs if sorted(a[1]) != sorted(b[1]) or not _names_agree([a, b])
                 or len(_foreground_names([a, b])) > 1), pairs[0])


def _foreground_names(spaces) -> set[str]:
    """The names teachers that name their classes give their foregrounds."""
    return {n.lower() for _, vs, ns in spaces if _named(vs, ns) for v, n in zip(vs, ns) if v != 0}


def _names_agree(spaces) -> bool:
    """No value named differently by two teachers that both name their classes."""
    seen: dict[int, str] = {}
    for _, values, names in spaces:
        if not _named(values, names):
            continue
        for v, n in zip(values, names):
            if seen.setdefault(v, n.lower()) != n.lower():
                return False
    return True


def _names_for(values: list[int], spaces) -> list[str]:
    """Target names: those of the first teacher that names each value, else the value."""
    names = {}
    for _, vs, ns in spaces:
        if _named(vs, ns):
            for v, n in zip(vs, ns):
                names.setdefault(v, n)
    return [names.get(v, str(v)) for v in values]


def _binary(spaces) -> Unified:
    """Binary teachers with background 0: the foregrounds are one class, valued as most teachers value it."""
    foregrounds = [max(v) for _, v, _ in spaces]
    target = Counter(foregrounds).most_common(1)[0][0]  # ties: the first teacher's
    name = next((ns[vs.index(fg)] for (_, vs, ns), fg in zip(spaces, foregrounds) if _named(vs, ns)), str(target))
    mappings = [TeacherMapping(s, list(v), [0 if x == 0 else 1 for x in v], "value") for s, v, _ in spaces]
    return Unified([0, target], [_names_for([0], spaces)[0], name], mappings)


def _by_name(spaces) -> Unified:
    """The union of the teachers' class names; each name keeps the value of the first teacher that has it (or
    the next free value when that one is taken)."""
    order: dict[str, int] = {BACKGROUND: 0}
    shown: dict[str, str] = {BACKGROUND: BACKGROUND}
    for _, values, names in spaces:
        for v, n in zip(values, names):
            key = BACKGROUND if _is_background(v, n) else n.lower()
            if key not in order:
                taken = set(order.values())
                order[key] = v if v not in taken else max(taken) + 1
                shown[key] = n
    target = sorted(order, key=order.get)
    values = [order[k] for k in target]
    mappings = [TeacherMapping(s, list(vs), [target.index(BACKGROUND if _is_background(v, n) else n.lower())
                                             for v, n in zip(vs, ns)], "name") for s, vs, ns in spaces]
    return Unified(values, [shown[k] for k in target], mappings)


def _by_map(spaces, label_map: LabelMap, explicit: list[dict]) -> Unified:
    """Explicit mappings, then names and values, onto `label_map.classes` (or, without it, onto the union of
    the mapped values)."""
    targets: dict[int, str] = dict(label_map.classes)
    chosen: list[list[int]] = []
    for (spec, values, names), own in zip(spaces, explicit):
        row = []
        for v, n in zip(values, names):
            target = _lookup(own, v, n)
            target = _lookup(label_map.map, v, n) if target is None else target
            if target is None:
                target = _by_target_name(targets, n) if _named(values, names) else None
            if target is None:
                target = v if (not targets or v in targets) else None
            if isinstance(target, str):
                target = _by_target_name(targets, target)
                if target is None:
                    raise NaktError(spec, f"class {v} ({n}) maps to a name the target classes lack "
                                          f"({_shown(targets)})", "add it under classes: in the label map")
            if target is None:
                raise NaktError(spec, f"class {v} ({n}) has no place in the target classes {_shown(targets)}",
                                "map it (map: or teachers: in --label-map, or ?map=) or add it under classes:")
            row.append(int(target))
        chosen.append(row)
    values = sorted(targets) if label_map.classes else sorted({t for row in chosen for t in row} | {0})
    names = [targets[v] for v in values] if label_map.classes else _names_for(values, spaces)
    mappings = [TeacherMapping(s, list(v), [values.index(t) for t in row], "map")
                for (s, v, _), row in zip(spaces, chosen)]
    return Unified(values, names, mappings)


def _lookup(pairs: dict, value: int, name: str):
    if value in pairs:
        return pairs[value]
    return pairs.get(name.lower())


def _by_target_name(targets: dict[int, str], name: str) -> int | None:
    return next((v for v, n in targets.items() if n.lower() == name.lower()), None)


def _shown(targets: dict[int, str]) -> str:
    return "{" + ", ".join(f"{v}: {n}" for v, n in sorted(targets.items())) + "}" if targets else "{}"
