import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from nakt.classify.losses import cumulative_targets, kd_loss, soften
from nakt.classify.metrics import classification_scores, quadratic_kappa


def test_kd_loss_matches_hand_computed_kl_with_temperature_squared():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1]])
    for t in (1.0, 4.0):
        q = torch.softmax(torch.log(teacher) / t, 1)[0]
        p = torch.softmax(student / t, 1)[0]
        expected = t**2 * float((q * (q / p).log()).sum())
        assert float(kd_loss(student, teacher, temperature=t)) == pytest.approx(expected, rel=1e-5)
    # one-hot target at T = 1 is plain cross-entropy
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    ce = torch.nn.functional.cross_entropy(student, torch.tensor([1]))
    assert float(kd_loss(student, onehot)) == pytest.approx(float(ce), rel=1e-4)
    # alpha mixes the softened teacher term with the hard-label term
    mixed = kd_loss(student, teacher, temperature=4.0, alpha=0.3, hard_probs=onehot)
    parts = 0.3 * kd_loss(student, teacher, temperature=4.0) + 0.7 * kd_loss(student, onehot)
    assert float(mixed) == pytest.approx(float(parts), rel=1e-5)


def test_binary_kd_for_multilabel_and_ordinal_targets():
    logits = torch.tensor([[1.0, -2.0]])
    target = torch.tensor([[0.9, 0.2]])
    t = 2.0
    soft = soften(target, t, "sigmoid")
    p = torch.sigmoid(logits / t)
    kl = soft * (soft / p).log() + (1 - soft) * ((1 - soft) / (1 - p)).log()
    assert float(kd_loss(logits, target, head="sigmoid", temperature=t)) == pytest.approx(t**2 * float(kl.mean()),
                                                                                      rel=1e-4)
    assert cumulative_targets(torch.tensor([[0.2, 0.3, 0.5]]))[0].tolist() == pytest.approx([0.8, 0.5])
    assert math.isfinite(float(kd_loss(torch.zeros(1, 2), torch.tensor([[0.2, 0.3, 0.5]]), head="ordinal")))


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = classification_scores(probs, labels, graded=True)["mean"]
    pred = probs.argmax(1)
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert scores["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert scores["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert scores["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert scores["kappa"] == pytest.approx(skm.cohen_kappa_score(labels, pred, weights="quadratic"))
    fixed_truth, fixed_pred = np.array([0, 1, 2, 3, 4, 4, 2]), np.array([0, 2, 2, 3, 3, 4, 0])
    assert quadratic_kappa(fixed_pred, fixed_truth, 5) == pytest.approx(
        skm.cohen_kappa_score(fixed_truth, fixed_pred, weights="quadratic"))
    multilabel = (rng.random((100, 3)) < 0.4).astype(int)
    mprobs = np.clip(multilabel * 0.6 + rng.random((100, 3)) * 0.5, 0, 1)
    ml = classification_scores(mprobs, multilabel)
    expected = [skm.roc_auc_score(multilabel[:, c], mprobs[:, c]) for c in range(3)]
    assert ml["per_class"]["auc"] == pytest.approx(expected)


def test_table_probs_reads_in_chunks_with_the_same_result(tmp_path):
    from PIL import Image

    from nakt.classify.data import LabelTable
    from nakt.classify.stages import table_probs
    from nakt.models import ModelCard, build_model

    rng = np.random.default_rng(0)
    files = []
    for i in range(9):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(files[-1])
    table = LabelTable(files, [f.name for f in files], np.arange(9) % 2, ["a", "b"], "index")
    torch.manual_seed(0)
    model = build_model(ModelCard("timm:resnet10t", 1, 2, task="classification", size=[16],
                                  class_names=["a", "b"])).eval()
    whole = table_probs(model, table, progress=False)
    assert whole.shape == (9, 2)
    np.testing.assert_allclose(table_probs(model, table, progress=False, chunk=4), whole, atol=1e-5)
    attacked = table_probs(model, table, progress=False, attack=("fgsm", 0.5, 1), chunk=4)
    np.testing.assert_allclose(table_probs(model, table, progress=False, attack=("fgsm", 0.5, 1)), attacked, atol=1e-5)
    assert np.abs(attacked - whole).max() > 1e-3  # the attack changed the predictions


def test_class_balanced_weights_give_every_class_the_same_share():
    from nakt.classify.prepared import class_balanced_weights

    targets = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])  # soft targets: classes by argmax
    weights = class_balanced_weights(targets)
    np.testing.assert_allclose(weights, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    draws = np.random.default_rng(0).choice(4, 20000, p=weights)
    assert abs((draws == 3).mean() - 0.5) < 0.02


def test_classification_only_options_are_refused_for_segmentation():
    from nakt.errors import NaktError
    from nakt.train import TrainOptions, train

    with pytest.raises(NaktError, match="--balance-classes applies to classification only"):
        train(TrainOptions(model="smp:Unet/resnet18", images="x", masks="y", out="z", balance_classes=True))
    with pytest.raises(NaktError, match="--temperature applies to classification only"):
        train(TrainOptions(model="smp:Unet/resnet18", images="x", masks="y", out="z", temperature=2.0))


def test_training_reads_images_lazily_beyond_the_cache_limit_with_the_same_result(tmp_path, monkeypatch):
    from conftest import write_random_pngs

    import nakt
    import nakt.classify.prepared as prepared
    from nakt.classify.data import read_labels
    from nakt.models import ModelCard

    write_random_pngs(tmp_path)
    table = read_labels(str(tmp_path), str(tmp_path / "labels.csv"), None, None)
    card = ModelCard("timm:resnet10t", 1, 2, task="classification", size=[16], class_names=["0", "1"])
    cached = prepared.training_images(table, card, progress=False)
    lazy = prepared.training_images(table, card, progress=False, cache_limit=0)
    assert isinstance(cached, torch.Tensor) and isinstance(lazy, prepared.LazyImages) and len(lazy) == 12
    assert torch.equal(lazy[np.array([5, 0, 7])], cached[[5, 0, 7]]) and torch.equal(lazy[2:9], cached[2:9])

    common = {"model": "timm:resnet10t", "task": "classification", "images": str(tmp_path), "size": [16],
              "labels": str(tmp_path / "labels.csv"), "val_fraction": 0.25, "epochs": 2, "batch_size": 4,
              "progress": False}
    in_memory = nakt.train(out=str(tmp_path / "cached"), **common)
    monkeypatch.setattr(prepared, "CACHE_LIMIT_BYTES", 0)
    from_disk = nakt.train(out=str(tmp_path / "lazy"), **common)
    history = [json.loads((run / "metrics.json").read_text())["history"] for run in (in_memory, from_disk)]
    losses = [[h["train_loss"] for h in run] for run in history]
    assert len(losses[0]) == 2 and None not in losses[0] and losses[0] == losses[1]
