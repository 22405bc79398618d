"""Resuming an interrupted training: the engine's `fit` with ``resume=True`` ends as an uninterrupted run would,
for either task adapter."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nakt.errors import NaktError
from nakt.io import rundir
from nakt.io.trainstate import TRAINING_STATE, clear_training_state, read_training_state
from nakt.models import ModelCard, build_model
from nakt.train import TrainOptions
from nakt.train.checkpoint import TrainingState
from nakt.train.engine import FitOptions, fit
from nakt.train.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Stands for a SIGKILL inside the loop."""


def interrupt(monkeypatch, epoch: int, after_save: bool) -> None:
    """Stop the loop in `epoch`: after its training state is written but before its best weights and
    metrics.json (`after_save`), or just before its state is written (the previous epoch is then complete)."""
    save = TrainingState.save

    def stopping(self, e):
        if e == epoch and not after_save:
            raise Interrupted
        save(self, e)
        if e == epoch:
            raise Interrupted

    monkeypatch.setattr(TrainingState, "save", stopping)


def epochs_trained(monkeypatch, call) -> tuple:
    """What `call()` returns, and the epochs it trains (read from the training states it saves, one after
    each epoch)."""
    trained = []
    save = TrainingState.save
    with monkeypatch.context() as m:
        m.setattr(TrainingState, "save", lambda self, e: (trained.append(e), save(self, e))[1])
        return call(), trained


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def history(run: Path) -> list[dict]:
    timing = ("seconds", "val_seconds")
    return [{k: v for k, v in entry.items() if k not in timing} for entry in rundir.read_metrics(run)["history"]]


# --- segmentation ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg_samples(synthetic2d):
    from nakt.io.dataset import discover_cases
    from nakt.train.data import cached_cases, survey_cases

    card = ModelCard("monai:UNet", 1, 2, label_values=[0, 255], size=[32])
    infos = survey_cases(discover_cases(synthetic2d / "images", synthetic2d / "masks")[:12], progress=False)
    return card, cached_cases(infos[:9], card, 2**30)[0], cached_cases(infos[9:], card, 2**30)[0]


def seg_fit(card, train, val, run: Path, resume: bool = False) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_model(card)
    task = SegmentationTask(card, train, val, augment=True, spatial_augment=True)
    metrics = fit(model, task, run, FitOptions(epochs=4, batch_size=4, lr=3e-3, seed=3, progress=False), resume=resume)
    return model.state_dict(), metrics


@pytest.mark.parametrize("with_val", [True, False])
@pytest.mark.parametrize(("epoch", "after_save"), [(3, False), (2, True), (4, True)])
def test_segmentation_resume_equals_uninterrupted(seg_samples, tmp_path, monkeypatch, epoch, after_save, with_val):
    """Stopped with epoch 2 complete, or between epoch 2's (or the last epoch's) state and its files."""
    card, train, val = seg_samples
    val = val if with_val else []  # without validation every epoch is the best one: its weights are rewritten
    whole, metrics = seg_fit(card, train, val, tmp_path / "whole")
    assert len(metrics["history"]) == 4

    with monkeypatch.context() as m:
        interrupt(m, epoch, after_save)
        with pytest.raises(Interrupted):
            seg_fit(card, train, val, tmp_path / "cut")
    state = read_training_state(tmp_path / "cut")
    saved = epoch if after_save else epoch - 1
    assert state["epoch"] == saved
    assert set(state["generators"]) == {"batches"}  # the epoch plans' seeds decide crops and augmentation
    assert len(rundir.read_metrics(tmp_path / "cut")["history"]) == (saved - 1 if after_save else saved)

    (resumed, metrics_resumed), trained = epochs_trained(
        monkeypatch, lambda: seg_fit(card, train, val, tmp_path / "cut", resume=True))
    # only the epochs after the saved one (a restart from epoch 1 would end with the same weights too: training
    # is deterministic)
    assert trained == list(range(saved + 1, 5))
    assert same_weights(rundir.read_weights(tmp_path / "whole"), rundir.read_weights(tmp_path / "cut"))
    assert same_weights(whole, resumed)
    assert history(tmp_path / "whole") == history(tmp_path / "cut")
    assert metrics_resumed["best_epoch"] == metrics["best_epoch"]
    assert metrics_resumed["best_val_score"] == metrics["best_val_score"]
    assert metrics_resumed["best_val_metric"] == "dice"


def test_resume_after_the_last_epoch_just_finishes(seg_samples, tmp_path):
    card, train, val = seg_samples
    weights, metrics = seg_fit(card, train, val, tmp_path)
    again, metrics_again = seg_fit(card, train, val, tmp_path, resume=True)  # e.g. killed before cleaning up
    assert same_weights(weights, again)
    assert metrics_again == metrics


def test_resume_without_state_or_with_a_broken_one_is_a_one_line_error(seg_samples, tmp_path):
    card, train, val = seg_samples
    with pytest.raises(NaktError, match="nothing to resume"):
        seg_fit(card, train, val, tmp_path, resume=True)
    (tmp_path / TRAINING_STATE).write_bytes(b"PK\x03\x04 cut off")
    (tmp_path / f".tmp-abc{TRAINING_STATE}").write_bytes(b"half written when killed")
    with pytest.raises(NaktError, match="unreadable training state") as err:
        seg_fit(card, train, val, tmp_path, resume=True)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob(".tmp-*"))
    clear_training_state(tmp_path)
    assert read_training_state(tmp_path) is None
    clear_training_state(tmp_path)  # nothing there: fine


def test_state_loads_without_unpickling_code_and_must_fit_the_options(seg_samples, tmp_path):
    card, train, val = seg_samples
    seg_fit(card, train, val, tmp_path)
    state = torch.load(tmp_path / TRAINING_STATE, weights_only=True)
    assert state["epoch"] == state["epochs"] == 4 and state["best"]["best_epoch"] >= 1
    assert {"model", "optimizer", "schedule"} <= set(state["state_dicts"])
    with pytest.raises(NaktError, match="resumed with 5"):
        fit(build_model(card), SegmentationTask(card, train, val), tmp_path,
            FitOptions(epochs=5, batch_size=4, lr=3e-3, progress=False), resume=True)
    other = ModelCard("monai:UNet", 1, 3, label_values=[0, 1, 2], size=[32])
    with pytest.raises(NaktError, match="does not fit"):
        fit(build_model(other), SegmentationTask(other, train, val), tmp_path,
            FitOptions(epochs=4, batch_size=4, lr=3e-3, progress=False), resume=True)


# --- classification ---------------------------------------------------------------------------------------------

def cls_fit(run: Path, resume: bool = False) -> dict:
    """A tiny timm student with an EMA and two online teachers drawn at random (RoS-KD)."""
    from nakt.classify.data import LabelTable
    from nakt.classify.prepared import target_probs
    from nakt.train.classification import ClassificationTask
    from nakt.train.online import OnlineTeachers

    card = ModelCard("timm:resnet10t", 1, 2, task="classification", size=[32], class_names=["a", "b"])
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    images = torch.as_tensor(rng.normal(size=(24, 1, 32, 32)) + labels[:, None, None, None] * 0.5).half()
    table = LabelTable([Path(f"{i}.png") for i in range(24)], [str(i) for i in range(24)], labels, card.class_names,
                       "index")
    train, val = table.subset(list(range(16))), table.subset(list(range(16, 24)))
    teachers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        teachers.append(build_model(card).eval())
    torch.manual_seed(0)
    model = build_model(card)
    opts = TrainOptions(model=card.spec, images="", out=str(run), task="classification", epochs=4, batch_size=4,
                        lr=3e-3, ema=0.9, teacher=["t1", "t2"], teacher_mode="random", seed=5, progress=False)
    task = ClassificationTask(card, images[:16], target_probs(train), images[16:], val, augment=opts.augment)
    online = OnlineTeachers(teachers, card, opts.teacher_mode, seed=opts.seed)
    fit(model, task, run, FitOptions.of(opts), online, resume=resume)
    return model.state_dict()


@pytest.mark.parametrize("after_save", [False, True])
def test_classification_resume_with_ema_and_teachers_equals_uninterrupted(tmp_path, monkeypatch, after_save):
    whole = cls_fit(tmp_path / "whole")
    with monkeypatch.context() as m:
        interrupt(m, 2 if after_save else 3, after_save)
        with pytest.raises(Interrupted):
            cls_fit(tmp_path / "cut")
    state = read_training_state(tmp_path / "cut")
    assert state["epoch"] == 2 and {"batches", "teachers"} == set(state["generators"])
    assert "n_averaged" in state["state_dicts"]["ema"]
    resumed, trained = epochs_trained(monkeypatch, lambda: cls_fit(tmp_path / "cut", resume=True))
    assert trained == [3, 4]
    assert same_weights(rundir.read_weights(tmp_path / "whole"), rundir.read_weights(tmp_path / "cut"))
    assert same_weights(whole, resumed)
    assert history(tmp_path / "whole") == history(tmp_path / "cut")


# --- end to end: SIGKILL during nakt train ------------------------------------------------------------------

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def train_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nakt", "train", "--model", "monai:UNet", "--images", str(data / "images"),
            "--masks", str(data / "masks"), "--cases", f"{data / 'splits.json'}:transferal", "--size", "48",
            "--epochs", "4", "--batch-size", "4", "--spatial-augment", "--device", "cpu", "--seed", "2",
            "--out", str(out), "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(synthetic2d, tmp_path_factory) -> Path:
    """The same `nakt train` run, in this process (it trains as the command does), never interrupted."""
    from nakt.cli import main

    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(train_command(synthetic2d, out)[3:]) == 0
    return out


def kill_after_first_epoch(command: list[str], run: Path) -> None:
    """Start `command`, wait until its training state holds a finished epoch, then SIGKILL it."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if (run / TRAINING_STATE).is_file() and read_training_state(run)["epoch"] >= 1:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"nakt train ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("resume_with", ["out only", "full command"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(synthetic2d, uninterrupted, tmp_path, resume_with):
    run = tmp_path / "cut"
    kill_after_first_epoch(train_command(synthetic2d, run), run)
    assert 1 <= read_training_state(run)["epoch"] < 4

    saved = read_training_state(run)["epoch"]
    again = [sys.executable, "-m", "nakt", "train", "--out", str(run), "--resume"]  # with progress lines
    if resume_with == "full command":
        again = [a for a in train_command(synthetic2d, run) if a != "--no-progress"] + ["--resume"]
    done = subprocess.run(again, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # it went on after the saved epoch (a restart from epoch 1 would end with the same weights too: training
    # is deterministic); the epochs trained are those it reports, one line each
    trained = [int(e) for e in re.findall(r"^epoch (\d+)/4 ", done.stderr, re.MULTILINE)]
    assert trained == list(range(saved + 1, 5)), done.stderr[-2000:]
    assert same_weights(rundir.read_weights(uninterrupted), rundir.read_weights(run))
    assert history(uninterrupted) == history(run)
    assert not (run / TRAINING_STATE).exists()
