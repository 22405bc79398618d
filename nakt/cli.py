"""The ``nakt`` command: one subcommand per pipeline verb, each a thin layer over the Python API.

Flags equal the options dataclass fields (``--val-images`` -> ``val_images``); ``--config FILE.yaml`` fills
the same fields, flags given on the command line win. Every verb ends with one summary line on stdout; bad
input ends with one line on stderr naming the file or option, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

from nakt.errors import NaktError
from nakt.fusion import FUSIONS
from nakt.models.card import TASKS

__all__ = ["build_parser", "main", "summary_line"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _document(parser: argparse.ArgumentParser, options_cls) -> None:
    """Append each flag's default from the options dataclass (the real default: flags default to None so that
    YAML configs can fill them) and mark required ones."""
    defaults = {f.name: f for f in dataclasses.fields(options_cls)}
    for action in parser._actions:
        field = defaults.get(action.dest)
        if field is None or action.help == argparse.SUPPRESS:
            continue
        text = action.help or ""
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            text += " (required)"
        elif field.default not in (None, False, True) and not isinstance(field.default, dict):
            text += f" (default: {field.default})"
        action.help = text.strip()


def _data_flags(p: argparse.ArgumentParser, masks: bool = True) -> None:
    p.add_argument("--images", help="folder of images (files, or one folder per case)")
    if masks:
        p.add_argument("--masks", help="folder of masks paired by case name")
        p.add_argument("--mask-file", help="glob of the mask file inside case folders (e.g. 'OTMultiClass*')")
    p.add_argument("--cases", help="case list: text file, JSON list, or splits.json:KEY")
    p.add_argument("--channels", nargs="+", help="file-name globs of the modality files in case folders, in order")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: GPU when present)")
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _classification_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", help="classification: CSV (image,label or one 0/1 column per finding) or a label set;"
                   " default: class folders under --images")
    p.add_argument("--label-column", help="classification: the CSV column holding the class (default: label)")


def _inference_flags(p: argparse.ArgumentParser,
                     batch_help: str = "cases per network batch (8 for 2D models, 1 for 3D)") -> None:
    """How a verb that runs models over many cases batches them (`nakt.batched.InferenceOptions`)."""
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument("--num-workers", type=int, help="processes decoding and preparing images")
    from nakt.inference import PRECISIONS, TTAS

    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="network arithmetic: auto is bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32")
    p.add_argument("--tta", choices=list(TTAS), help="flip: mean of each image and its mirror")


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="let pickled checkpoints (nnU-Net's) load types beyond nakt's allow-list: only for files "
                   "you trust, since unpickling can run code")


def _train_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", help=model_help)
    _data_flags(p)
    p.add_argument("--task", choices=list(TASKS))
    _classification_flags(p)
    p.add_argument("--val-labels", help="classification: labels of --val-images")
    p.add_argument("--head", choices=["softmax", "sigmoid", "ordinal"], help="classification head")
    p.add_argument("--temperature", type=float, help="distillation temperature for soft labels (Hinton KD)")
    p.add_argument("--teacher", action="append", help="online distillation from this network (run directory, "
                   "torchscript:, onnx:, bundle:), run on the student's augmented batches (repeat for several)")
    p.add_argument("--teacher-mode", choices=["random", "mean"], help="random: one teacher per step (RoS-KD); "
                   "mean: all, fused by --fusion")
    p.add_argument("--fusion", choices=list(FUSIONS),
                   help="how online teachers are fused per sample with --teacher-mode mean (default mean)")
    p.add_argument("--alpha", type=float, help="weight of the teachers against the stored targets (default 0.5)")
    p.add_argument("--ema", type=float, help="keep an exponential moving average of the weights (e.g. 0.999)")
    p.add_argument("--recipe", choices=["targeted"], help="targeted: discriminative LRs + gradual unfreezing")
    p.add_argument("--unfreeze-every", type=int, help="targeted recipe: epochs between unfreezing steps")
    p.add_argument("--init", help="start from the weights of another run (e.g. the same body part)")
    p.add_argument("--subsets", type=int, help="RoS-KD: train K teachers on overlapping random subsets")
    p.add_argument("--subset-fraction", type=float, help="fraction of the data in each subset (default 0.6)")
    p.add_argument("--label-noise", type=float, help="flip this fraction of training labels (experiments)")
    p.add_argument("--balance-classes", action="store_true", default=None,
                   help="classification: sample each class equally often per epoch (imbalanced tasks)")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--val-images", help="validation images (default: hold out --val-fraction of the cases)")
    p.add_argument("--val-masks", help="validation masks (default: the --masks folder)")
    p.add_argument("--val-cases", help="validation case list")
    p.add_argument("--val-fraction", type=float, help="cases held out for validation without --val-images "
                   "(0: none; the last epoch is kept)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--size", type=int, nargs="+", help="resize to this size before the network (128 or 256 192)")
    p.add_argument("--patch", type=int, nargs="+", help="train on patches, infer with sliding windows (96 96 64)")
    p.add_argument("--patches-per-case", type=int)
    p.add_argument("--normalization", choices=["zscore", "minmax", "none"])
    p.add_argument("--in-channels", type=int, help="network input channels (default: the images'; grey<->RGB "
                   "is converted)")
    p.add_argument("--label-values", type=int, nargs="+",
                   help="all label values the model predicts (default: those found in the masks)")
    p.add_argument("--hard-labels", action="store_true", default=None,
                   help="with a label set as --masks: train on its hard masks, not its soft probabilities")
    p.add_argument("--min-confidence", type=float,
                   help="with soft labels: leave pixels (classification: images) whose top probability is below "
                   "this out of the loss")
    p.add_argument("--pixel-weights", choices=["none", "agreement", "confidence"],
                   help="segmentation: weigh each pixel's loss by the label set's teacher agreement there, or by "
                   "the target's confidence (default none)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--spatial-augment", action="store_true", default=None,
                   help="segmentation: also rotate (up to 15 degrees) and scale (0.85-1.15) images with targets")
    p.add_argument("--freeze-encoder-epochs", type=int, help="keep the encoder (classifiers: all but the head) "
                   "frozen for this many epochs (finetune: 5, none with --recipe targeted)")
    from nakt.inference import PRECISIONS

    p.add_argument("--precision", choices=list(PRECISIONS), help="training arithmetic (autocast): auto is bf16 on "
                   "GPUs and on CPUs with AVX512-BF16 or AMX, else fp32")
    p.add_argument("--num-workers", type=int, help="DataLoader processes reading and augmenting training images "
                   "(default: none when every image fits the cache, else half the CPU cores up to 4)")
    p.add_argument("--cache-gb", type=float, help="hold prepared images in memory up to this many GiB (validation "
                   "first; default: 0 for segmentation, which keeps them in RUN/prepared/, else 4)")
    p.add_argument("--no-disk-cache", dest="disk_cache", action="store_false", default=None,
                   help="segmentation: decode and prepare images beyond --cache-gb every epoch instead of writing "
                   "them once to RUN/prepared/ (removed when training ends)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="run training steps through torch.compile (Inductor; the first steps take longer)")
    p.add_argument("--pretrained", help="local weights file for the encoder (never downloaded)")
    p.add_argument("--seed", type=int)
    p.add_argument("--orientation", help="3D: reorient volumes to this anatomical orientation before the network "
                   "(a nibabel axcode such as RAS or LPS; none keeps storage order)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a run directory of nakt's own (never a folder nakt did not write)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted run in --out from its last finished epoch (its options are "
                   "read back from its config.json)")


def build_parser() -> argparse.ArgumentParser:
    from nakt import __version__
    from nakt.demo import DemoOptions
    from nakt.evaluate import EvaluateOptions
    from nakt.export import ExportOptions
    from nakt.export_nnunet import ExportNnunetOptions
    from nakt.label import LabelOptions
    from nakt.predict import PredictOptions
    from nakt.report import ReportOptions
    from nakt.train import FinetuneOptions, TrainOptions

    parser = _Parser(prog="nakt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nakt {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a model (teacher or student) and write a run directory")
    _train_flags(p, "model spec: smp:Unet/resnet18, monai:UNet, ... (or a run directory to continue)")
    _document(p, TrainOptions)

    p = sub.add_parser("finetune", help="continue a run on a small labelled set (lower LR, frozen encoder)")
    _train_flags(p, "run directory to fine-tune")
    _document(p, FinetuneOptions)

    p = sub.add_parser("distill", help="train a student with teachers running on its augmented batches "
                       "(online KD; RoS-KD with --teacher-mode random)")
    _train_flags(p, "student model spec")
    _document(p, TrainOptions)

    p = sub.add_parser("label", help="teachers annotate images; write a fused label set")
    p.add_argument("--teacher", action="append", help="run directory, torchscript:FILE, onnx:FILE, nnunet:DIR, "
                   "bundle:DIR, masks:DIR or probs:DIR (repeat for several)")
    _data_flags(p, masks=False)
    p.add_argument("--out", help="label-set folder (masks/, probs/, manifest.json)")
    p.add_argument("--fusion", choices=list(FUSIONS), help="mean, weighted (validation Dice), vote, staple, "
                   "staple-weighted (mean weighted by STAPLE's label-free quality estimates), confidence (per-pixel "
                   "weights from each teacher's entropy), trimmed-vote (vote of the teachers left after dropping "
                   "the one that agrees least with the others, per case); default vote for 2+ segmentation teachers, "
                   "else mean")
    p.add_argument("--sharpen", type=float, help="temperature of the fused soft labels: p^(1/T) renormalised "
                   "(T < 1 sharpens; default 1)")
    p.add_argument("--task", choices=list(TASKS))
    p.add_argument("--weights", type=float, nargs="+", help="teacher weights for --fusion weighted")
    p.add_argument("--weighting", choices=["dice", "inverse-error"],
                   help="weights from validation Dice: the Dice itself (default) or 1 / (1 - Dice)")
    p.add_argument("--save-teacher-probs", action="store_true", default=None)
    _trust_flag(p)
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a label set of nakt's own instead of resuming it")
    p.add_argument("--num-parts", type=int, help="split the cases into this many parts, each labelled by its own "
                   "process into the same --out (SLURM arrays; torchrun splits by itself)")
    p.add_argument("--part-id", type=int, help="the part this process labels, 0 .. num-parts - 1")
    _inference_flags(p, "cases per network batch, 8 for 2D and 1 for 3D teachers (also the unit of parts and "
                        "resume)")
    _document(p, LabelOptions)

    p = sub.add_parser("predict", help="segment (or classify) images with a trained model")
    p.add_argument("--model", help="any spec label accepts: run directory, torchscript:, onnx:, nnunet:, bundle:, "
                   "masks:, probs:")
    _data_flags(p, masks=False)
    p.add_argument("--out", help="folder for the predicted masks (new or empty)")
    p.add_argument("--task", choices=list(TASKS), help="checked against the model's")
    p.add_argument("--save-probs", action="store_true", default=None)
    _trust_flag(p)
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an earlier nakt predictions folder")
    _inference_flags(p)
    _document(p, PredictOptions)

    p = sub.add_parser("evaluate", help="Dice and HD95 against masks (AUC... for classification); writes "
                       "summary.json")
    p.add_argument("--model", help="model to evaluate: any spec label accepts")
    p.add_argument("--pred", help="folder of predicted masks (instead of --model)")
    _data_flags(p)
    p.add_argument("--out", help="folder for summary.json (new or empty)")
    p.add_argument("--task", choices=list(TASKS), help="checked against the model's")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier nakt evaluation")
    _classification_flags(p)
    p.add_argument("--graded", action="store_true", default=None, help="classification: add quadratic kappa")
    p.add_argument("--attack", choices=["fgsm", "pgd"], help="classification: score under an adversarial attack")
    p.add_argument("--eps", type=float, help="attack size in normalised intensity units (default 0.01)")
    p.add_argument("--steps", type=int, help="PGD steps (default 10)")
    p.add_argument("--roi", help="folder of region masks (e.g. a field of view); outside counts as background")
    p.add_argument("--no-hd95", dest="hd95", action="store_false", default=None)
    _trust_flag(p)
    _inference_flags(p)
    _document(p, EvaluateOptions)

    p = sub.add_parser("report", help="a static page: teacher agreement, the cases ranked by disagreement (review "
                       "queue), per-teacher label-free quality, training curves")
    p.add_argument("--labels", help="label set written by nakt label")
    p.add_argument("--images", help="the label set's images")
    p.add_argument("--masks", help="true masks, when there are any: the labels' Dice is plotted")
    p.add_argument("--mask-file", help="glob of the mask file inside case folders")
    p.add_argument("--cases", help="case list: text file, JSON list, or splits.json:KEY")
    p.add_argument("--channels", nargs="+", help="file-name globs of the modality files in case folders, in order")
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--runs", nargs="+", help="run directories whose training curves to plot")
    p.add_argument("--out", help="report folder (new or empty): index.html, cases/, plots/, report.json")
    p.add_argument("--queue", type=int, help="cases of the review queue drawn on the page (default 24)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier nakt report")
    _document(p, ReportOptions)

    p = sub.add_parser("export", help="write a run as an ONNX or TorchScript file with its sidecar contract "
                       "(checked against the run before returning)")
    p.add_argument("--model", help="run directory to export")
    p.add_argument("--format", choices=["onnx", "torchscript"])
    p.add_argument("--out", help="file to write (its contract goes to FILE.json)")
    p.add_argument("--images", help="folder whose first image is also compared (default: a random input only)")
    p.add_argument("--opset", type=int, help="ONNX opset")
    p.add_argument("--atol", type=float, help="largest accepted probability difference from the run")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier nakt export")
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    _document(p, ExportOptions)

    p = sub.add_parser("export-nnunet", help="write a label set as an nnU-Net v2 raw dataset (an nnU-Net student)")
    p.add_argument("--labels", help="label set written by nakt label")
    p.add_argument("--images", help="the images the label set labels")
    p.add_argument("--out", help="<nnUNet_raw>/DatasetNNN_Name")
    p.add_argument("--cases", help="case list: text file, JSON list, or splits.json:KEY")
    p.add_argument("--channels", nargs="+", help="file-name globs of the modality files in case folders, in order")
    p.add_argument("--channel-names", nargs="+", help="nnU-Net channel names (CT for Hounsfield units)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier nakt export")
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    _document(p, ExportNnunetOptions)

    p = sub.add_parser("demo", help="the whole pipeline on generated data (a few minutes on a CPU)")
    p.add_argument("--out", help="working folder (new, empty, or an earlier demo's, which is replaced)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    _document(p, DemoOptions)
    return parser


def _run(args: argparse.Namespace):
    import nakt

    values = {k: v for k, v in vars(args).items() if k not in ("verb", "config")}
    if args.verb == "demo":
        from nakt.demo import DemoOptions, demo

        return demo(DemoOptions(**{k: v for k, v in values.items() if v is not None}))
    if args.verb in ("export", "export-nnunet"):
        return getattr(nakt, args.verb.replace("-", "_"))(config=args.config, **values)
    if args.verb == "distill":
        if not values.get("teacher"):
            raise NaktError(None, "nakt distill needs --teacher (a run directory or network file; repeatable)")
        return nakt.train(config=args.config, **values)
    return getattr(nakt, args.verb)(config=args.config, **values)


def _mean_agreement(label_set: Path) -> str:
    from nakt.io import labelset

    manifest = labelset.read_manifest(label_set)
    if manifest.get("task") == "classification":
        return f"{manifest['cases']} images, teacher agreement {manifest.get('teacher_agreement', 0):.3f}"
    cases = manifest.get("cases", {})
    scores = [c["agreement"]["pixel_agreement"] for c in cases.values() if "agreement" in c]
    agreement = f", mean teacher agreement {sum(scores) / len(scores):.4f}" if scores else " (one teacher)"
    return f"{len(cases)} cases{agreement}"


def summary_line(verb: str, result) -> str:
    """The one line a verb prints when it ends: where its result is and what it scored."""
    from nakt.io import outputs, rundir

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
