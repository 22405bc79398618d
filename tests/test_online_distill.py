"""Online distillation for segmentation: teachers run on the student's own augmented batch, in their own terms
(channels, normalisation, grid), fused per sample, alone or mixed with a stored label set."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import constant_floor, dice, read_label_maps, untrained_twin

import nakt
from nakt.cli import main
from nakt.errors import NaktError
from nakt.fusion import fuse_partial
from nakt.io import rundir
from nakt.models import ModelCard, build_model
from nakt.preprocess import prepare_image
from nakt.teachers import NetTeacher
from nakt.train.online import OnlineTeachers, online_teachers, student_classes


def run(*args) -> int:
    return main([str(a) for a in args] + ["--no-progress"])


def test_a_teacher_sees_the_students_batch_as_its_own_input():
    """A grey z-score teacher on an RGB min-max student's batch (intensity-augmented too): the same
    probabilities as the teacher on its own preparation of the image. (Images of the network's size: after a
    resize the statistics are taken on the student's grid, a slightly different affine intensity map.)"""
    torch.manual_seed(0)
    teacher = build_model(ModelCard("monai:UNet", 1, 3, label_values=[0, 1, 2], size=[32])).eval()
    student = ModelCard("monai:UNet", 3, 3, label_values=[0, 1, 2], size=[32], normalization="minmax")
    grey = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32)
    x = prepare_image(np.repeat(grey, 3, axis=0), student)[None]
    online = OnlineTeachers([teacher], student)
    with torch.no_grad():
        own = teacher.predict_proba(prepare_image(grey, teacher.card)[None])
    got = online(x)
    assert got.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, own, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(online(1.1 * x - 0.05), own, atol=1e-5, rtol=1e-4)  # jitter undone by z-score
    with torch.no_grad():  # a flipped batch is taught what the teacher sees in the flipped image
        own_flipped = teacher.predict_proba(prepare_image(grey[:, :, ::-1].copy(), teacher.card)[None])
    torch.testing.assert_close(online(x.flip(-1)), own_flipped, atol=1e-5, rtol=1e-4)


def test_fused_teachers_per_sample_by_any_rule():
    torch.manual_seed(0)
    card = ModelCard("monai:UNet", 1, 2, label_values=[0, 255], size=[32])
    models = [build_model(card).eval() for _ in range(3)]
    x = torch.randn(2, 1, 32, 32)
    each = torch.stack([OnlineTeachers([m], card)(x) for m in models])
    torch.testing.assert_close(OnlineTeachers(models, card, "mean")(x), each.mean(0))
    vote = OnlineTeachers(models, card, "mean", fusion="vote")(x)
    majority = (each.argmax(2).sum(0) >= 2).long()
    assert torch.equal(vote.argmax(1), majority) and set(vote.unique().tolist()) <= {0.0, 1.0}
    drawn = OnlineTeachers(models, card, "random", seed=1)
    assert any(torch.equal(drawn(x), e) for e in each)  # one teacher per step


@pytest.fixture(scope="module")
def teacher_run(unet_teacher):
    return unet_teacher


def test_distill_segmentation_without_masks_and_mixed_with_a_label_set(synthetic2d, teacher_run, tmp_path):
    s = synthetic2d / "splits.json"
    images = ["--images", synthetic2d / "images", "--cases", f"{s}:transferal", "--size", 48]
    # the teachers alone teach: no masks of the transferal set are read, validation on the teachers' val split;
    # batches of 2 give the student the ~18 steps an smp net needs here to beat an untrained one clearly
    assert run("distill", "--model", "smp:Unet/resnet18", "--teacher", teacher_run, "--teacher", teacher_run,
               "--teacher-mode", "mean", "--fusion", "vote", *images, "--epochs", 3, "--batch-size", 2, "--lr", 3e-3,
               "--val-images", synthetic2d / "images", "--val-masks", synthetic2d / "masks", "--val-cases",
               f"{s}:teacher_val", "--out", tmp_path / "online") == 0
    config = json.loads((tmp_path / "online" / "config.json").read_text())
    assert config["training"]["teacher"] == [str(teacher_run)] * 2 and not config["training"]["soft_targets"]
    assert config["label_values"] == [0, 255]
    assert len(config["training"]["trained_on"]) == 12
    assert rundir.read_metrics(tmp_path / "online")["best_val_metric"] == "dice"

    labels = nakt.label(teacher=[str(teacher_run)], images=str(synthetic2d / "images"), cases=f"{s}:transferal",
                        out=str(tmp_path / "labels"), progress=False, device="cpu")
    for alpha, out in ((0.5, "mixed"), (1.0, "teachers_only")):
        assert run("distill", "--model", "smp:Unet/resnet18", "--teacher", teacher_run, "--masks", labels,
                   "--alpha", alpha, *images, "--epochs", 1, "--val-fraction", 0, "--precision", "fp32",
                   "--out", tmp_path / out) == 0
    mixed, alone = (rundir.read_metrics(tmp_path / o)["history"] for o in ("mixed", "teachers_only"))
    assert mixed[0]["train_loss"] != pytest.approx(alone[0]["train_loss"], rel=1e-4)  # the label set counts

    # what distillation is for: the student's masks on the transferal images agree with the teacher's (its label
    # set's masks) better than an untrained network of the same architecture does, and than any constant mask
    # (floor 0.27 here, the student 0.79)
    def agreement(student) -> float:
        return nakt.evaluate(model=str(student), images=str(synthetic2d / "images"), masks=str(labels / "masks"),
                             cases=f"{s}:transferal", out=str(tmp_path / f"agree_{student.name}"), hd95=False,
                             progress=False)["mean"]["dice"]

    taught = read_label_maps(sorted((labels / "masks").glob("*.png")), [0, 255])
    floor = max(constant_floor(taught, 2), agreement(untrained_twin(tmp_path / "online", tmp_path / "untrained")))
    assert agreement(tmp_path / "online") > floor + 0.3, floor


@pytest.mark.parametrize("spec, message", [("masks:{masks}", "not a network nakt runs"),
                                           ("probs:{masks}", "not a network nakt runs"),
                                           ("nnunet:{masks}", "not a network nakt runs")])
def test_teachers_that_cannot_see_a_batch_are_one_line(synthetic2d, tmp_path, capsys, spec, message):
    code = run("distill", "--model", "monai:UNet", "--teacher", spec.format(masks=synthetic2d / "masks"),
               "--images", synthetic2d / "images", "--size", 32, "--epochs", 1, "--out", tmp_path / "x")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "x" / "model.safetensors").exists()


def _net(values: list[int], names: list[str], seed: int):
    torch.manual_seed(seed)
    card = ModelCard("monai:UNet", 1, len(values), label_values=values, class_names=names, size=[32])
    return NetTeacher(f"teacher{seed}", build_model(card).eval())


def test_online_teachers_in_other_label_languages_are_mapped_and_partial_ones_fused_per_class():
    """Teachers that name their classes differently from the student, and know only some of them: each one's
    probabilities land on the student's classes by name, and every sample is fused per class over the teachers
    that know it (`fuse_partial`), as `nakt label` does."""
    a = _net([0, 1, 2], ["background", "liver", "spleen"], 0)
    b = _net([0, 10, 20], ["background", "spleen", "kidney"], 1)
    student = ModelCard("monai:UNet", 1, 4, label_values=[0, 1, 2, 3],
                        class_names=["background", "liver", "spleen", "kidney"], size=[32])
    targets = student_classes([a, b], student)
    assert targets == [[0, 1, 2], [0, 2, 3]]
    x = torch.randn(2, 1, 32, 32)
    got = online_teachers([a, b], student, torch.device("cpu"), "mean", "vote")(x)
    own = [OnlineTeachers([t.model], t.card)(x).numpy() for t in (a, b)]  # each in its own classes
    mapped = np.zeros((2, 2, 4, 32, 32), np.float32)  # [K, B, C, ...]
    mapped[0][:, [0, 1, 2]], mapped[1][:, [0, 2, 3]] = own
    known = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    expected = np.stack([fuse_partial(mapped[:, i], known, "vote")[0] for i in range(2)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    with pytest.raises(NaktError, match="teacher-mode mean"):  # one partial teacher alone would teach "absent"
        online_teachers([a, b], student, torch.device("cpu"), "random")
    binary = _net([0, 1], ["0", "1"], 2)  # {0, 1} onto a {0, 255} student: one foreground each, no map needed
    grey = ModelCard("monai:UNet", 1, 2, label_values=[0, 255], size=[32])
    torch.testing.assert_close(online_teachers([binary], grey, torch.device("cpu"))(x),
                               OnlineTeachers([binary.model], binary.card)(x))
    with pytest.raises(NaktError, match=r"predicts label values \[20\]"):  # kidney: not the student's
        student_classes([b], dataclasses.replace(student, classes=3, label_values=[0, 1, 2],
                                                 class_names=["background", "liver", "spleen"]))


def test_distill_from_teachers_with_different_label_values_needs_no_map(synthetic2d, teacher_run, tmp_path):
    """The issue's case online: the same teacher as 0/255 and declared as 0/1 (`?labels=0,1`) teach one student
    together, without a map; the student learns their masks."""
    s = synthetic2d / "splits.json"
    assert run("distill", "--model", "monai:UNet", "--teacher", teacher_run, "--teacher", f"{teacher_run}?labels=0,1",
               "--teacher-mode", "mean", "--images", synthetic2d / "images", "--cases", f"{s}:transferal",
               "--size", 32, "--epochs", 3, "--lr", 1e-2, "--val-fraction", 0, "--precision", "fp32",
               "--out", tmp_path / "student") == 0
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["label_values"] in ([0, 1], [0, 255])
    labels = nakt.label(teacher=[str(teacher_run)], images=str(synthetic2d / "images"), cases=f"{s}:transferal",
                        out=str(tmp_path / "labels"), progress=False, device="cpu")
    taught = read_label_maps(sorted((labels / "masks").glob("*.png")), [0, 255])
    pred = nakt.predict(model=str(tmp_path / "student"), images=str(synthetic2d / "images"), cases=f"{s}:transferal",
                        out=str(tmp_path / "pred"), progress=False)
    learnt = read_label_maps(sorted(pred.glob("*.png")), config["label_values"])
    agreement = float(np.mean([dice(p, t, 2) for p, t in zip(learnt, taught)]))
    assert agreement > constant_floor(taught, 2) + 0.3, agreement
