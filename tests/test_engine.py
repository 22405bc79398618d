"""One training engine for both tasks: options that work for both have an effect in both, options of the other
task are refused with one line, metrics.json has one best-score key, and the packages do not import in circles."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nakt.cli import main
from nakt.io import rundir
from nakt.io.trainstate import read_training_state
from nakt.models import ModelCard, build_model
from nakt.train.engine import FitOptions, fit

ROOT = Path(__file__).resolve().parents[1]


# --- tiny tasks in memory -----------------------------------------------------------------------------------------

def seg_task(val: bool = False, **kw):
    """An smp U-Net (it has an encoder) on eight 32x32 squares."""
    from nakt.train.segmentation import SegmentationTask

    card = ModelCard("smp:Unet/resnet18", 1, 2, label_values=[0, 1], size=[32])
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(8):
        target = torch.zeros(32, 32, dtype=torch.uint8)
        a, b = rng.integers(4, 16, 2)
        target[a:a + 12, b:b + 12] = 1
        samples.append({"image": target[None].float() + torch.randn(1, 32, 32) * 0.3, "target": target})
    return card, SegmentationTask(card, samples[:6], samples[6:] if val else [], **kw)


def cls_task(val: bool = False, **kw):
    """A timm ResNet-10t on 16 grey 32x32 images of two classes."""
    from nakt.classify.data import LabelTable
    from nakt.classify.prepared import target_probs
    from nakt.train.classification import ClassificationTask

    card = ModelCard("timm:resnet10t", 1, 2, task="classification", size=[32], class_names=["a", "b"])
    labels = np.arange(16) % 2
    images = torch.as_tensor(np.random.default_rng(0).normal(size=(16, 1, 32, 32)) + labels[:, None, None, None])
    table = LabelTable([Path(f"{i}.png") for i in range(16)], [str(i) for i in range(16)], labels, card.class_names,
                       "index")
    x_val = images[12:].half() if val else images[:0].half()
    return card, ClassificationTask(card, images[:12].half(), target_probs(table.subset(list(range(12)))), x_val,
                                    table.subset(list(range(12, 16))), **kw)


TASKS = {"segmentation": seg_task, "classification": cls_task}


def train_tiny(name: str, run: Path, val: bool = False, task_kw: dict | None = None, **opts):
    card, task = TASKS[name](val, **(task_kw or {}))
    torch.manual_seed(0)
    model = build_model(card)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    options = FitOptions(**{"epochs": 2, "batch_size": 4, "lr": 3e-3, "precision": "fp32", "progress": False, **opts})
    metrics = fit(model, task, run, options)
    return model, task, initial, metrics


# --- options that work for both tasks -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TASKS)
def test_freeze_encoder_epochs_keeps_the_encoder_and_its_statistics(name, tmp_path):
    model, task, initial, metrics = train_tiny(name, tmp_path, freeze_encoder_epochs=2)
    encoder = set(task.encoder(model))
    assert encoder and len(encoder) < len(dict(model.named_parameters()))  # something is frozen, not everything
    after = model.state_dict()
    # parameters and BatchNorm running statistics of the encoder stay; the rest trains
    stats = {k for k in after if k.endswith(("running_mean", "running_var")) and
             k.rsplit(".", 1)[0] + ".weight" in encoder}
    assert stats and all(torch.equal(initial[k], after[k]) for k in encoder | stats)
    assert not all(torch.equal(initial[k], after[k]) for k in after if k not in encoder | stats)
    assert [h["encoder_frozen"] for h in metrics["history"]] == [True, True]


@pytest.mark.parametrize("name", TASKS)
def test_ema_is_what_is_scored_and_saved_without_changing_training(name, tmp_path):
    plain = train_tiny(name, tmp_path / "plain")[0]
    smoothed = train_tiny(name, tmp_path / "ema", ema=0.5)[0]
    raw = [read_training_state(tmp_path / run)["state_dicts"] for run in ("plain", "ema")]
    assert "ema" in raw[1] and "ema" not in raw[0]
    # the trained weights follow the same path; the saved (last, no validation) weights are the average
    assert all(torch.equal(raw[0]["model"][k], raw[1]["model"][k]) for k in raw[0]["model"])
    saved = rundir.read_weights(tmp_path / "ema")
    assert any(not torch.equal(saved[k], raw[1]["model"][k]) for k in saved if saved[k].is_floating_point())
    assert all(torch.equal(saved[k], smoothed.state_dict()[k]) for k in saved)
    assert not all(torch.equal(plain.state_dict()[k], smoothed.state_dict()[k]) for k in saved)


@pytest.mark.parametrize("name", TASKS)
def test_min_confidence_leaves_unsure_targets_out_of_the_loss(name):
    card, task = TASKS[name](min_confidence=0.8)
    _, plain = TASKS[name]()
    batch = torch.utils.data.default_collate([task.samples[(i, i)] for i in range(4)])
    target = batch["target"].float().clone()
    unsure = (slice(None), slice(None), slice(0, 16)) if name == "segmentation" else (slice(0, 2),)
    target[unsure] = 1.0 / target.shape[1]  # soft and unsure: top probability 0.5
    batch = {"image": batch["image"], "target": target}
    torch.manual_seed(0)
    logits = torch.randn(4, 2, *target.shape[2:])
    other = logits.clone()
    other[unsure] = torch.randn_like(other[unsure]) * 5
    assert task.loss(logits, batch).item() == pytest.approx(task.loss(other, batch).item(), rel=1e-6)
    assert plain.loss(logits, batch).item() != pytest.approx(plain.loss(other, batch).item(), rel=1e-3)


@pytest.mark.parametrize("name", TASKS)
def test_precision_is_autocast_and_recorded(name, tmp_path):
    from nakt.inference import resolve_precision

    _, _, _, bf16 = train_tiny(name, tmp_path / "bf16", val=True, epochs=1, precision="bf16")
    _, _, _, auto = train_tiny(name, tmp_path / "auto", val=True, epochs=1, precision="auto")
    assert bf16["precision"] == "bf16" and auto["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert np.isfinite(bf16["history"][0]["train_loss"]) and 0 <= bf16["best_val_score"] <= 1
    assert bf16["best_val_metric"] == {"segmentation": "dice", "classification": "auc"}[name]

    seen = []  # the network runs in bf16 under autocast
    model_cls = torch.nn.Conv2d
    forward = model_cls.forward

    def spy(self, x):
        out = forward(self, x)
        seen.append(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_cls, "forward", spy)
        train_tiny(name, tmp_path / "spy", epochs=1, precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}


def test_fp16_keeps_its_gradient_scaler_in_the_resume_state(tmp_path, monkeypatch):
    """fp16 scales the loss (GradScaler); an interrupted fp16 run resumes to the uninterrupted weights."""
    from test_resume import Interrupted, interrupt, same_weights

    _, _, _, metrics = train_tiny("classification", tmp_path / "whole", precision="fp16")
    assert metrics["precision"] == "fp16" and all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    with monkeypatch.context() as m:
        interrupt(m, 1, after_save=True)
        with pytest.raises(Interrupted):
            train_tiny("classification", tmp_path / "cut", precision="fp16")
    assert read_training_state(tmp_path / "cut")["state_dicts"]["scaler"]["scale"] > 0
    card, task = cls_task()
    model = build_model(card)
    fit(model, task, tmp_path / "cut", FitOptions(epochs=2, batch_size=4, lr=3e-3, precision="fp16", progress=False),
        resume=True)
    assert same_weights(rundir.read_weights(tmp_path / "whole"), rundir.read_weights(tmp_path / "cut"))


# --- options of the other task: one line, exit 2 --------------------------------------------------------------------

SEG = "train --model monai:UNet --images {d}/images --masks {d}/masks --out {d}/out --no-progress"
CLS = "train --task classification --model timm:resnet10t --images {d}/images --out {d}/out --no-progress"
REFUSED = [
    (SEG + " --temperature 2", "--temperature applies to classification only"),
    (SEG + " --head sigmoid", "--head applies to classification only"),
    (SEG + " --alpha 0.3", "--alpha weighs online teachers"),
    (CLS + " --teacher-mode mean", "--teacher-mode weighs online teachers"),
    (SEG + " --val-labels {d}/val.csv", "--val-labels applies to classification only"),
    (SEG + " --fusion vote", "--fusion weighs online teachers"),
    (SEG + " --balance-classes", "--balance-classes applies to classification only"),
    (SEG + " --label-noise 0.1", "--label-noise applies to classification only"),
    (SEG + " --subsets 2", "--subsets applies to classification only"),
    (CLS + " --spatial-augment", "--spatial-augment applies to segmentation only"),
    (CLS + " --hard-labels", "--hard-labels applies to segmentation only"),
    (CLS + " --patch 16 16", "--patch applies to segmentation only"),
    (CLS + " --masks {d}/masks", "--masks applies to segmentation only"),
    (CLS + " --orientation LPS", "--orientation applies to segmentation only"),
    (CLS + " --label-values 0 1", "--label-values applies to segmentation only"),
    (CLS + " --no-disk-cache", "--disk-cache applies to segmentation only"),
    (CLS + " --val-metric pooled", "--val-metric applies to segmentation only"),
    (CLS + " --batch-dice", "--batch-dice applies to segmentation only"),
    (SEG + " --recipe targeted --freeze-encoder-epochs 2", "--freeze-encoder-epochs does not combine"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[f"{i:02d}" for i in range(len(REFUSED))])
def test_an_option_of_the_other_task_is_one_line_exit_2(tmp_path, capsys, argv, message):
    capsys.readouterr()
    assert main(argv.format(d=tmp_path).split()) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_refusal_through_python_m_nakt(tmp_path):
    argv = CLS.format(d=tmp_path).split() + ["--spatial-augment"]
    done = subprocess.run([sys.executable, "-m", "nakt", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--spatial-augment applies to segmentation only" in lines[0] and not (tmp_path / "out").exists()


# --- end to end: finetune's default freezing now reaches classification --------------------------------------------

def test_classification_finetune_freezes_the_backbone_first_and_metrics_have_one_key(tmp_path):
    from conftest import write_random_pngs

    import nakt
    from nakt.train import FinetuneOptions

    write_random_pngs(tmp_path)
    common = {"task": "classification", "images": str(tmp_path), "labels": str(tmp_path / "labels.csv"),
              "size": [16], "val_fraction": 0.25, "batch_size": 4, "progress": False, "precision": "fp32"}
    base = nakt.train(model="timm:resnet10t", out=str(tmp_path / "base"), epochs=1, **common)
    tuned = nakt.finetune(model=str(base), out=str(tmp_path / "ft"), epochs=2, freeze_encoder_epochs=1, **common)
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert [h["encoder_frozen"] for h in metrics["history"]] == [True, False]
    assert metrics["best_val_metric"] == "auc" and "best_val_dice" not in metrics and metrics["precision"] == "fp32"
    assert json.loads((tuned / "config.json").read_text())["training"]["precision"] == "fp32"
    assert FinetuneOptions(model="m", images="i", out="o").freeze_encoder_epochs == 5
    assert FinetuneOptions(model="m", images="i", out="o", recipe="targeted").freeze_encoder_epochs == 0


class _Echo(torch.nn.Module):
    """A 'network' whose logits are the one-hot of the label map it is given as its image: its prediction is
    whatever the test puts in the image."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # validation reads the device off a parameter

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).movedim(-1, 1).float() * 20


def test_pooled_validation_scores_a_rare_class_by_its_pixels_not_its_cases():
    """Ten validation cases: class 1 large in all, class 2 (rare) a small blob in one. A model that never
    predicts class 2 scores 0.95 by the per-case mean (nine cases have no class 2 to miss) but 0.5 pooled
    (class 2's Dice is 0); one that finds class 2 scores 1.0 both ways; metrics.json names the metric."""
    from nakt.models.registry import NaktModel
    from nakt.train.segmentation import SegmentationTask

    card = ModelCard("monai:UNet", 1, 3, label_values=[0, 1, 2], size=[16])
    truths = []
    for i in range(10):
        truth = torch.zeros(16, 16, dtype=torch.uint8)
        truth[2:14, 2:8] = 1
        if i == 0:
            truth[10:13, 10:13] = 2
        truths.append(truth)
    blind = [torch.where(t == 2, 0, t) for t in truths]  # predicts everything but the rare class
    scores = {}
    for metric in ("dice", "pooled"):
        for name, predicted in (("blind", blind), ("sees", truths)):
            val = [{"image": p[None].float(), "target": t} for p, t in zip(predicted, truths)]
            task = SegmentationTask(card, [], val, val_metric=metric)
            scores[metric, name] = task.validate(NaktModel(_Echo(), card))
    assert scores["dice", "blind"] == pytest.approx(0.95) and scores["pooled", "blind"] == pytest.approx(0.5)
    assert scores["dice", "sees"] == scores["pooled", "sees"] == 1.0
    assert SegmentationTask(card, [], [], val_metric="pooled").metric == "pooled_dice"


def test_best_score_reads_old_and_new_metrics():
    assert rundir.best_score({"best_val_score": 0.9, "best_val_metric": "auc"}) == (0.9, "auc")
    assert rundir.best_score({"best_val_dice": 0.8}) == (0.8, "dice")  # a segmentation run from before
    assert rundir.best_score({}) == (None, "dice")


# --- package structure ----------------------------------------------------------------------------------------------

def _import_graph() -> dict[str, set[str]]:
    """nakt module -> the nakt modules it imports (at the top or inside functions), a submodule import counting
    for its packages too; the root ``nakt`` (the API re-exporting every verb) is left out."""
    graph = {}
    for path in (ROOT / "nakt").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nakt."):
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("nakt.")}
        graph[name] = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 2)}
    return {k: v & graph.keys() for k, v in graph.items()}


def test_classify_does_not_import_train():
    """nakt.train (engine, task adapters, the verb) uses nakt.classify's pieces, never the other way round, not
    even through a third module."""
    graph = _import_graph()
    seen = {m for m in graph if m.startswith("nakt.classify")}
    todo = list(seen)
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not {m for m in seen if m.startswith("nakt.train")}
    assert "nakt.classify.transfer" in graph["nakt.train.engine"]  # the check sees imports at all


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line(synthetic2d, tmp_path):
    """A diverged run (here lr 1e12) is an error naming the epoch and what to try, not a 'finished' run whose
    weights are whatever the last finite epoch left."""
    import nakt
    from nakt.errors import NaktError

    with pytest.raises(NaktError, match=r"training loss became nan in epoch \d") as err:
        nakt.train(model="monai:UNet", images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                   cases=f"{synthetic2d / 'splits.json'}:teacher_train", size=[32], epochs=3, lr=1e12,
                   val_fraction=0, precision="fp32", progress=False, out=str(tmp_path / "run"))
    assert "\n" not in str(err.value) and "a lower --lr" in str(err.value)


def _off(tensor: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """`tensor` with noise of `fraction` of its norm (relative L2) added."""
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed))
    return tensor + fraction * tensor.norm() * noise / noise.norm()


def test_compiled_gradients_are_compared_within_what_fp32_rounding_allows():
    """The check of a compiled fp32 training step takes gradients as close as fp32 BatchNorm allows: 1% off in
    relative L2 (eager fp32 itself is that far from float64 on a fresh smp Unet/resnet18), and rounding noise on
    a gradient that is zero in exact arithmetic (a convolution's bias before BatchNorm); not a gradient three
    times too large, nor a NaN."""
    from nakt.train.engine import _agrees

    output, loss, gradient, bias = torch.linspace(-3, 3, 64), torch.tensor(0.7), torch.linspace(-1, 1, 1000), \
        torch.full((8,), -1e-8)
    eager = (output, loss, [gradient, bias])
    assert _agrees((output, loss, [_off(gradient, 0.01), torch.full((8,), 1e-8)]), eager)
    assert not _agrees((output, loss, [3 * gradient, bias]), eager)
    assert not _agrees((output, loss, [gradient.clone().index_fill_(0, torch.tensor([3]), float("nan")), bias]),
                       eager)
    assert not _agrees((_off(output, 0.05), loss, [gradient, bias]), eager)


def test_compiled_reduced_precision_gradients_are_measured_against_fp32():
    """Under bf16 autocast the eager step itself is far from exact (a fresh smp Unet/resnet18 on an AVX512-BF16
    CPU: gradients up to 69% off per tensor, logits 11.6%), and a compiled step as far: measured against an fp32
    step, a compiled step as far from it as the eager one agrees; a gradient three times too large, a NaN, or a
    compiled step far off where the eager one is close does not."""
    from nakt.train.engine import _agrees

    output, loss, gradients = torch.linspace(-3, 3, 64), torch.tensor(0.7), [torch.linspace(-1, 1, 1000)] * 3
    fp32 = (output, loss, gradients)
    eager = (_off(output, 0.1, 1), loss * 1.0005, [_off(g, 0.6, i) for i, g in enumerate(gradients)])
    compiled = (_off(output, 0.1, 2), loss * 0.9995, [_off(g, 0.7, 10 + i) for i, g in enumerate(gradients)])
    assert _agrees(compiled, eager, fp32)
    assert not _agrees(compiled, eager, None)  # the fp32 rule would drop it: 70% is no fp32 rounding
    assert not _agrees((compiled[0], compiled[1], [3 * g for g in gradients]), eager, fp32)
    assert not _agrees((compiled[0], compiled[1], [compiled[2][0] * float("nan"), *compiled[2][1:]]), eager, fp32)
    close_eager = (output, loss, [_off(g, 0.01, i) for i, g in enumerate(gradients)])
    assert not _agrees(compiled, close_eager, fp32)  # the yardstick is the eager step's own rounding
