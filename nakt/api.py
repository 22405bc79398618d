"""The public API: each pipeline verb takes its options dataclass, or the same fields as keyword arguments
(plus ``config=`` for a YAML file with those keys), and returns what it wrote."""

from __future__ import annotations

from pathlib import Path

from nakt.config import gather_values, make_options
from nakt.errors import NaktError
from nakt.evaluate import EvaluateOptions
from nakt.evaluate import evaluate as _evaluate
from nakt.export import ExportOptions
from nakt.export import export as _export
from nakt.export_nnunet import ExportNnunetOptions
from nakt.export_nnunet import export_nnunet as _export_nnunet
from nakt.label import LabelOptions
from nakt.label import label as _label
from nakt.models import load
from nakt.predict import PredictOptions
from nakt.predict import predict as _predict
from nakt.report import ReportOptions
from nakt.report import report as _report
from nakt.train import FinetuneOptions, TrainOptions, resume_options
from nakt.train import finetune as _finetune
from nakt.train import train as _train

__all__ = ["evaluate", "export", "export_nnunet", "finetune", "label", "load", "predict", "report", "train"]


def _options(cls, opts, config, kwargs):
    if isinstance(opts, cls):
        return opts
    if issubclass(cls, TrainOptions) and kwargs.get("resume"):  # the interrupted run's options, from its folder
        given, _ = gather_values(cls, config, **kwargs)
        if given.get("out") is None:
            raise NaktError(config, "missing option 'out'", "give --out RUN with --resume")
        return resume_options(given["out"], given, cls)
    return make_options(cls, config, **kwargs)


def train(opts: TrainOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Train a model spec on images + masks (or a label set); returns the run directory.

    ``nakt.train(model="smp:Unet/resnet18", images="imgs", masks="masks", out="runs/t1", size=[128])``;
    ``nakt.train(out="runs/t1", resume=True)`` continues an interrupted run from its last finished epoch.
    """
    return _train(_options(TrainOptions, opts, config, kwargs))


def finetune(opts: FinetuneOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Continue a run on a small labelled set (lower LR, encoder frozen at first); returns the new run."""
    return _finetune(_options(FinetuneOptions, opts, config, kwargs))


def label(opts: LabelOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Teachers annotate images; returns the label-set folder (masks/, probs/, manifest.json)."""
    return _label(_options(LabelOptions, opts, config, kwargs))


def predict(opts: PredictOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Segment images with a trained model; returns the output folder."""
    return _predict(_options(PredictOptions, opts, config, kwargs))


def evaluate(opts: EvaluateOptions | None = None, *, config: str | None = None, **kwargs) -> dict:
    """Dice / HD95 against masks (from `model` or `pred`); writes and returns summary.json."""
    return _evaluate(_options(EvaluateOptions, opts, config, kwargs))


def report(opts: ReportOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """A static page (index.html, PNGs, report.json) showing a label set's teacher agreement, the cases ranked by
    disagreement (the review queue) and per-teacher label-free quality; returns its folder."""
    return _report(_options(ReportOptions, opts, config, kwargs))


def export(opts: ExportOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Write a run as an ONNX or TorchScript file plus its sidecar contract; returns the file."""
    return _export(_options(ExportOptions, opts, config, kwargs))


def export_nnunet(opts: ExportNnunetOptions | None = None, *, config: str | None = None, **kwargs) -> Path:
    """Write a label set as an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json); returns its folder."""
    return _export_nnunet(_options(ExportNnunetOptions, opts, config, kwargs))
