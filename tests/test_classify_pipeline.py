"""Classification through the same verbs, on a small PneumoniaMNIST sample (28x28 grey chest X-rays)."""

import csv
import json

import numpy as np
import pytest
from conftest import shared_dataset

from nakt.cli import main


@pytest.fixture(scope="module")
def pneumonia(tmp_path_factory):
    """train/ + train.csv, val/ + val.csv, and test/ as class folders (NORMAL/, PNEUMONIA/)."""
    from PIL import Image

    data = np.load(shared_dataset("pneumoniamnist") / "pneumoniamnist.npz")
    root = tmp_path_factory.mktemp("pneumonia")
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("val", 80), ("test", 120)):
        labels = data[f"{split}_labels"][:, 0]
        # balanced sample: the shared train split is 90% pneumonia
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)])
        rows = []
        for i in idx:
            name = f"{split}{i:05d}.png"
            if split == "test":
                name = f"{['NORMAL', 'PNEUMONIA'][labels[i]]}/{name}"
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data[f"{split}_images"][i]).save(root / split / name)
            rows.append((name, int(labels[i])))
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), *rows])
    return root


def run(*args) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


def test_classification_teacher_label_student_evaluate(pneumonia, tmp_path):
    r = pneumonia
    common = ["--task", "classification", "--size", 28, "--batch-size", 32]
    assert run("train", "--model", "timm:resnet18", "--images", r / "train", "--labels", r / "train.csv",
               "--val-images", r / "val", "--val-labels", r / "val.csv", "--epochs", 4, "--lr", 3e-3,
               "--out", tmp_path / "teacher", *common) == 0
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert config["task"] == "classification" and config["class_names"] == ["0", "1"]

    assert run("label", "--task", "classification", "--teacher", tmp_path / "teacher", "--images", r / "val",
               "--out", tmp_path / "labels") == 0
    with open(tmp_path / "labels" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and all(abs(float(x["0"]) + float(x["1"]) - 1) < 1e-4 for x in rows)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["task"] == "classification" and manifest["class_names"] == ["0", "1"]
    assert manifest["fusion"] == "mean"  # the default for classification keeps soft class probabilities

    assert run("train", "--model", "timm:mobilenetv2_100", "--images", r / "val", "--labels", tmp_path / "labels",
               "--temperature", 2, "--epochs", 2, "--out", tmp_path / "student", *common) == 0
    assert json.loads((tmp_path / "student" / "config.json").read_text())["training"]["soft_targets"] is True

    # the test split is given as class folders; their names must match the model's classes
    assert run("evaluate", "--model", tmp_path / "teacher", "--images", r / "test", "--out", tmp_path / "bad") == 2
    assert run("evaluate", "--model", tmp_path / "teacher", "--images", r / "test", "--labels", r / "test.csv",
               "--out", tmp_path / "eval", "--graded") == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["mean"]) == {"auc", "accuracy", "f1", "balanced_accuracy", "ece", "kappa"}
    assert summary["mean"]["auc"] > 0.75, summary["mean"]  # 240 balanced 28-px images, 4 epochs
    assert len(summary["per_case"]) == 120 and len(summary["per_class"]["auc"]) == 2

    assert run("evaluate", "--model", tmp_path / "teacher", "--images", r / "test", "--labels", r / "test.csv",
               "--out", tmp_path / "attacked", "--attack", "pgd", "--eps", 0.1, "--steps", 3) == 0
    attacked = json.loads((tmp_path / "attacked" / "summary.json").read_text())["mean"]
    assert attacked["accuracy"] < summary["mean"]["accuracy"]

    assert run("predict", "--model", tmp_path / "student", "--images", r / "test", "--out", tmp_path / "pred") == 0
    with open(tmp_path / "pred" / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 120 and {p["prediction"] for p in preds} <= {"0", "1"}
    assert preds[0]["image"].startswith(("NORMAL/", "PNEUMONIA/"))


def test_roskd_teachers_online_distillation_and_targeted_recipe(pneumonia, tmp_path):
    r = pneumonia
    common = ["--size", 28, "--batch-size", 32, "--val-images", r / "val", "--val-labels", r / "val.csv"]
    assert run("train", "--task", "classification", "--model", "timm:resnet18", "--images", r / "train",
               "--labels", r / "train.csv", "--subsets", 2, "--subset-fraction", 0.5, "--epochs", 1,
               "--out", tmp_path / "teachers", *common) == 0
    subsets = [(tmp_path / "teachers" / f"subset_{k}.txt").read_text().split() for k in (0, 1)]
    assert [len(s) for s in subsets] == [120, 120] and set(subsets[0]) != set(subsets[1])
    assert run("distill", "--model", "timm:mobilenetv2_100", "--teacher", tmp_path / "teachers" / "subset_0",
               "--teacher", tmp_path / "teachers" / "subset_1", "--teacher-mode", "random", "--ema", 0.9,
               "--temperature", 2, "--label-noise", 0.2, "--images", r / "train", "--labels", r / "train.csv",
               "--epochs", 1, "--out", tmp_path / "student", *common) == 0
    training = json.loads((tmp_path / "student" / "config.json").read_text())["training"]
    assert training["teacher_mode"] == "random" and training["label_noise"] == 0.2
    assert run("finetune", "--task", "classification", "--model", tmp_path / "teachers" / "subset_0", "--recipe",
               "targeted", "--balance-classes", "--images", r / "val", "--labels", r / "val.csv",
               "--val-fraction", 0.25, "--epochs", 2, "--size", 28, "--out", tmp_path / "targeted") == 0
    history = json.loads((tmp_path / "targeted" / "metrics.json").read_text())["history"]
    assert [sum(h["unfrozen_groups"]) for h in history] == [1, 2]
    assert json.loads((tmp_path / "targeted" / "config.json").read_text())["training"]["balance_classes"] is True
    assert run("distill", "--model", "timm:resnet18", "--images", r / "val", "--labels", r / "val.csv",
               "--out", tmp_path / "x") == 2  # no teacher: a one-line error
