"""Labels to trust: label sets keep the teachers' per-pixel agreement, and a student's loss can weigh pixels by
that agreement or by the target's confidence instead of dropping them."""

import numpy as np
import pytest
import torch

import nakt
from nakt.cli import main
from nakt.fusion import agreement_map, fuse
from nakt.io import labelset, rundir
from nakt.models import ModelCard


def seg_task(pixel_weights: str):
    from nakt.train.segmentation import SegmentationTask

    card = ModelCard("monai:UNet", 1, 2, label_values=[0, 1], size=[16])
    return SegmentationTask(card, [], [], pixel_weights=pixel_weights)


def test_pixel_weights_decide_each_pixels_share_of_the_loss():
    torch.manual_seed(0)
    target = torch.zeros(2, 2, 16, 16)
    target[:, 1, :, 8:] = 1.0
    target[:, 0] = 1 - target[:, 1]
    target[:, :, :4] = 0.5  # rows 0-3: a coin toss
    weight = torch.ones(2, 1, 16, 16)
    weight[:, :, 12:] = 0.0  # rows 12-15: the teachers disagree
    batch = {"target": target, "weight": weight}
    logits = torch.randn(2, 2, 16, 16)

    def changed(rows: slice) -> torch.Tensor:
        other = logits.clone()
        other[:, :, rows] = torch.randn_like(other[:, :, rows]) * 5
        return other

    confidence, agreement, plain = seg_task("confidence"), seg_task("agreement"), seg_task("none")
    for task, ignored in ((confidence, slice(0, 4)), (agreement, slice(12, 16))):
        assert task.loss(logits, batch).item() == pytest.approx(task.loss(changed(ignored), batch).item(), rel=1e-6)
        assert plain.loss(logits, batch).item() != pytest.approx(plain.loss(changed(ignored), batch).item(), rel=1e-3)
    assert agreement.loss(logits, batch).item() != pytest.approx(agreement.loss(changed(slice(0, 4)), batch).item(),
                                                                 rel=1e-3)


@pytest.fixture(scope="module")
def two_teachers(synthetic2d, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    split = synthetic2d / "splits.json"
    return [nakt.train(model=spec, images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                       cases=f"{split}:teacher_train", size=[32], epochs=1, out=str(root / name), val_fraction=0,
                       progress=False, device="cpu")
            for spec, name in (("monai:UNet", "unet"), ("monai:SegResNet", "segresnet"))]


def test_label_sets_keep_the_teachers_agreement_and_students_train_on_it(synthetic2d, two_teachers, tmp_path):
    split = synthetic2d / "splits.json"
    images = dict(images=str(synthetic2d / "images"), cases=f"{split}:transferal", progress=False, device="cpu")
    labels = nakt.label(teacher=[str(t) for t in two_teachers], out=str(tmp_path / "labels"),
                        save_teacher_probs=True, **images)
    name = labelset.read_manifest(labels)["cases"].popitem()[0]
    agreement = labelset.read_probs(labels, name, "agreement")
    teacher_probs = labelset.read_probs(labels, name, "teacher_probs")
    expected = agreement_map(teacher_probs, fuse(teacher_probs, "mean"))
    assert agreement.shape == expected.shape and set(np.unique(agreement)) <= {0.5, 1.0}
    assert (agreement == expected).mean() > 0.99  # stored probabilities round ties at 1/256

    common = ["--model", "monai:UNet", "--images", synthetic2d / "images", "--cases", f"{split}:transferal",
              "--size", 32, "--epochs", 1, "--no-progress"]
    argv = ["train", *common, "--masks", labels, "--pixel-weights", "agreement", "--out", tmp_path / "student"]
    assert main([str(a) for a in argv]) == 0
    history = rundir.read_metrics(tmp_path / "student")["history"]
    assert history[0]["train_loss"] > 0


@pytest.mark.parametrize("source, message", [("masks", "needs a label set"), ("one_teacher", "no teacher agreement")])
def test_agreement_weights_without_agreement_maps_are_one_line(synthetic2d, two_teachers, tmp_path, capsys,
                                                               source, message):
    split = synthetic2d / "splits.json"
    masks = synthetic2d / "masks"
    if source == "one_teacher":
        masks = nakt.label(teacher=[str(two_teachers[0])], images=str(synthetic2d / "images"),
                           cases=f"{split}:transferal", out=str(tmp_path / "one"), progress=False, device="cpu")
    code = main(["train", "--model", "monai:UNet", "--images", str(synthetic2d / "images"), "--masks", str(masks),
                 "--cases", f"{split}:transferal", "--pixel-weights", "agreement", "--size", "32", "--epochs", "1",
                 "--out", str(tmp_path / "student"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "student").exists()
