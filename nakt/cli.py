"""The ``nakt`` command: one subcommand per pipeline verb, each a thin layer over the Python API.

Each verb's flags are made from the fields of its options dataclass (`VERBS`): ``--val-images`` sets
``val_images``, its type, choices and help (under the section of ``--help`` the field names) come from the field
(`nakt.config.option`). ``--config FILE.yaml`` fills the same fields, flags given on the command line win. Every
verb ends with one summary line on stdout; bad input ends with one line on stderr naming the file or option, and
exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import types
import typing
from pathlib import Path

import nakt
from nakt.config import COMMON, GROUPS, option_info
from nakt.demo import DemoOptions, demo
from nakt.errors import NaktError
from nakt.evaluate import EvaluateOptions
from nakt.export import ExportOptions
from nakt.export_nnunet import ExportNnunetOptions
from nakt.io import labelset, outputs, rundir
from nakt.label import LabelOptions
from nakt.predict import PredictOptions
from nakt.report import ReportOptions
from nakt.train import FinetuneOptions, TrainOptions
from nakt.version import __version__

__all__ = ["VERBS", "build_parser", "main", "summary_line"]


class Verb(typing.NamedTuple):
    """A subcommand: its options dataclass, its help, the help of flags whose meaning this verb narrows, and
    whether it reads ``--config``."""

    options: type
    help: str
    helps: dict[str, str] = {}
    config: bool = True


VERBS = {
    "train": Verb(TrainOptions, "train a model (teacher or student) and write a run directory"),
    "finetune": Verb(FinetuneOptions, "continue a run on a small labelled set (lower LR, frozen "
                     "encoder)", {"model": "run directory to fine-tune"}),
    "distill": Verb(TrainOptions, "train a student with teachers running on its augmented batches "
                    "(online KD; RoS-KD with --teacher-mode random)",
                    {"model": "student model spec", "teacher": "teacher network (run directory, torchscript:, "
                     "onnx:, bundle:), run on the student's augmented batches; repeat for several (required)"}),
    "label": Verb(LabelOptions, "teachers annotate images; write a fused label set"),
    "predict": Verb(PredictOptions, "segment (or classify) images with a trained model"),
    "evaluate": Verb(EvaluateOptions, "Dice and HD95 against masks (AUC... for classification); "
                     "writes summary.json"),
    "report": Verb(ReportOptions, "a static page: teacher agreement, the cases ranked by disagreement "
                   "(review queue), per-teacher label-free quality, training curves"),
    "export": Verb(ExportOptions, "write a run as an ONNX or TorchScript file with its sidecar "
                   "contract (checked against the run before returning)"),
    "export-nnunet": Verb(ExportNnunetOptions, "write a label set as an nnU-Net v2 raw dataset "
                          "(an nnU-Net student)"),
    "demo": Verb(DemoOptions, "the whole pipeline on generated data (a few minutes on a CPU)",
                 config=False),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _value_type(hint) -> tuple[type, bool]:
    """``(item type, is a list)`` of a field's annotation: ``list[int] | None`` -> ``(int, True)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _help(field: dataclasses.Field, text: str) -> str:
    """The help with the field's real default appended (flags default to None so that a YAML config can fill
    them), or "(required)"."""
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        text += " (required)"
    elif not any(field.default is v for v in (None, False, True, dataclasses.MISSING)):
        text += f" (default: {field.default})"
    return text.strip().replace("%", "%%")


def _flag(field: dataclasses.Field, hint, info: dict, help_text: str) -> tuple[str, dict]:
    """The flag of one options field and its `add_argument` keywords: a bool is ``--name`` (store_true), or
    ``--no-name`` (store_false) when it defaults to True; a list takes several values, or with ``repeat`` one per
    flag (``--teacher A --teacher B``); int and float values are converted, choices offered."""
    name, (kind, many) = field.name.replace("_", "-"), _value_type(hint)
    kw = {"dest": field.name, "default": None, "help": _help(field, help_text)}
    if kind is bool:
        off = field.default is True
        return f"--no-{name}" if off else f"--{name}", {**kw, "action": "store_false" if off else "store_true"}
    if info["repeat"]:
        kw["action"] = "append"
    elif many:
        kw["nargs"] = "+"
    if kind in (int, float):
        kw["type"] = kind
    if info["choices"]:
        kw["choices"] = info["choices"]
    return f"--{name}", kw


def _add_options(parser: argparse.ArgumentParser, verb: Verb) -> None:
    """One flag per options field (but those declared ``cli=False``), in the `GROUPS` section the field names."""
    cls = verb.options
    hints = typing.get_type_hints(cls)
    sections: dict[str | None, list] = {}
    for field in dataclasses.fields(cls):
        info = option_info(cls, field.name)
        if info["cli"]:
            flag = _flag(field, hints[field.name], info, verb.helps.get(field.name, info["help"]))
            sections.setdefault(info["group"], []).append(flag)
    if verb.config:
        sections.setdefault(COMMON["config"]["group"], []).append(("--config", {"help": COMMON["config"]["help"]}))
    for key, title in GROUPS.items():
        group = parser.add_argument_group(title) if key in sections else None
        for flag, kw in sections.pop(key, []):
            group.add_argument(flag, **kw)
    if sections:
        ungrouped = [kw["dest"] for flags in sections.values() for _, kw in flags]
        raise TypeError(f"{cls.__name__}: no --help group for {ungrouped}")
    required = [f"--{f.name.replace('_', '-')} {f.name.upper()}" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    parser.usage = " ".join(["%(prog)s", *required, "[options]"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nakt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nakt {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        _add_options(sub.add_parser(name, help=verb.help, description=verb.help), verb)
    return parser


def _run(args: argparse.Namespace):
    values = {k: v for k, v in vars(args).items() if k not in ("verb", "config")}
    if args.verb == "demo":
        return demo(DemoOptions(**{k: v for k, v in values.items() if v is not None}))
    if args.verb in ("export", "export-nnunet"):
        return getattr(nakt, args.verb.replace("-", "_"))(config=args.config, **values)
    if args.verb == "distill":
        if not values.get("teacher"):
            raise NaktError(None, "nakt distill needs --teacher (a run directory or network file; repeatable)")
        return nakt.train(config=args.config, **values)
    return getattr(nakt, args.verb)(config=args.config, **values)


def _mean_agreement(label_set: Path) -> str:
    manifest = labelset.read_manifest(label_set)
    if manifest.get("task") == "classification":
        return f"{manifest['cases']} images, teacher agreement {manifest.get('teacher_agreement', 0):.3f}"
    cases = manifest.get("cases", {})
    scores = [c["agreement"]["pixel_agreement"] for c in cases.values() if "agreement" in c]
    agreement = f", mean teacher agreement {sum(scores) / len(scores):.4f}" if scores else " (one teacher)"
    return f"{len(cases)} cases{agreement}"


def summary_line(verb: str, result) -> str:
    """The one line a verb prints when it ends: where its result is and what it scored."""
    if verb in ("train", "finetune", "distill"):
        if outputs.holds_output(result, outputs.SUBSET_RUNS):
            return f"wrote the subset runs in {result}"
        metrics = rundir.read_metrics(Path(result))
        score, metric = rundir.best_score(metrics)
        shown = f"best validation {metric} {score:.4f} at epoch {metrics.get('best_epoch')}" \
            if isinstance(score, (int, float)) and score >= 0 else "no validation: last epoch kept"
        return f"wrote {result} ({shown}, {metrics.get('wall_seconds', 0):.0f} s)"
    if verb == "label":
        return f"wrote {result} ({_mean_agreement(Path(result))})"
    if verb == "predict":
        return f"wrote predictions to {result}"
    if verb == "export":
        return f"wrote {result} and its contract {result}.json (checked against the run)"
    if verb == "export-nnunet":
        return f"wrote the nnU-Net raw dataset {result}"
    if verb == "report":
        return f"wrote {result}/index.html"
    if verb == "evaluate":
        mean = result.get("mean", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if isinstance(v, (int, float)))
        return f"{shown or 'no scores'} over {len(result.get('per_case', []))} cases (summary.json written)"
    return ""


# OS errors a user can cause or fix (a full disk, a read-only or forbidden folder): one line, not a traceback
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                   errno.EISDIR, errno.ENAMETOOLONG}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already reported on one line)
        return int(exc.code or 0)
    try:
        result = _run(args)
    except NaktError as exc:
        print(f"nakt {args.verb}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"nakt {args.verb}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nakt {args.verb}: interrupted", file=sys.stderr)
        return 130
    line = summary_line(args.verb, result)
    if line:
        print(f"nakt {args.verb}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
