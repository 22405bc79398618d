"""Labels to trust: label sets keep the teachers' per-pixel agreement, and a student's loss can weigh pixels by
that agreement or by the target's confidence instead of dropping them."""

import json

import numpy as np
import pytest
import torch
from conftest import constant_floor, dice, read_label_maps, train_small_teacher, untrained_twin

import nakt
from nakt.cli import main
from nakt.fusion import FUSIONS, agreement_map, fuse
from nakt.io import labelset, rundir
from nakt.io.images import read_mask
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
def two_teachers(unet_teacher, synthetic2d, tmp_path_factory):
    """The shared UNet teacher and a SegResNet trained alike."""
    out = tmp_path_factory.mktemp("quality") / "segresnet"
    return [unet_teacher, train_small_teacher(synthetic2d, out, "monai:SegResNet")]


def test_label_sets_keep_the_teachers_agreement_and_students_train_on_it(synthetic2d, two_teachers, tmp_path):
    split = synthetic2d / "splits.json"
    images = dict(images=str(synthetic2d / "images"), cases=f"{split}:transferal", progress=False, device="cpu")
    labels = nakt.label(teacher=[str(t) for t in two_teachers], out=str(tmp_path / "labels"), fusion="mean",
                        save_teacher_probs=True, **images)
    name = labelset.read_manifest(labels)["cases"].popitem()[0]
    agreement = labelset.read_probs(labels, name, "agreement")
    teacher_probs = labelset.read_probs(labels, name, "teacher_probs")
    expected = agreement_map(teacher_probs, fuse(teacher_probs, "mean"))
    assert agreement.shape == expected.shape and set(np.unique(agreement)) <= {0.5, 1.0}
    assert (agreement == expected).mean() > 0.99  # stored probabilities round ties at 1/256

    common = ["--model", "monai:UNet", "--images", synthetic2d / "images", "--cases", f"{split}:transferal",
              "--size", 32, "--epochs", 3, "--lr", 1e-2, "--val-fraction", 0, "--no-progress"]
    argv = ["train", *common, "--masks", labels, "--pixel-weights", "agreement", "--out", tmp_path / "student"]
    assert main([str(a) for a in argv]) == 0

    # what the student is for: its masks agree with the label set's better than an untrained network of its
    # architecture does, and than any constant mask (floor and student are printed by a failure)
    def agreement(run) -> float:
        return nakt.evaluate(model=str(run), masks=str(labels / "masks"), out=str(tmp_path / f"agree_{run.name}"),
                             hd95=False, **images)["mean"]["dice"]

    fused = read_label_maps(sorted((labels / "masks").glob("*.png")), [0, 255])
    floor = max(constant_floor(fused, 2), agreement(untrained_twin(tmp_path / "student", tmp_path / "untrained")))
    score = agreement(tmp_path / "student")
    assert score > floor + 0.3, (score, floor)  # 0.84 against 0.22 here


def test_segmentation_label_sets_are_fused_by_vote_unless_told(synthetic2d, two_teachers, tmp_path):
    split = synthetic2d / "splits.json"
    labels = nakt.label(teacher=[str(t) for t in two_teachers], out=str(tmp_path / "labels"), save_teacher_probs=True,
                        images=str(synthetic2d / "images"), cases=f"{split}:transferal", progress=False, device="cpu")
    manifest = labelset.read_manifest(labels)
    assert manifest["fusion"] == "vote"
    for name in manifest["cases"]:
        fused, teacher_probs = (labelset.read_probs(labels, name, key) for key in ("probs", "teacher_probs"))
        assert set(np.unique(fused)) <= {0.0, 1.0}  # one-hot: every pixel is its majority's class
        assert (fused.argmax(0) == fuse(teacher_probs, "vote").argmax(0)).mean() > 0.99  # ties at 1/256 steps


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


def test_report_ranks_cases_by_disagreement_and_draws_them(synthetic2d, two_teachers, tmp_path):
    import json
    import re

    split = synthetic2d / "splits.json"
    labels = nakt.label(teacher=[str(t) for t in two_teachers], images=str(synthetic2d / "images"),
                        cases=f"{split}:transferal", out=str(tmp_path / "labels"), save_teacher_probs=True,
                        progress=False, device="cpu")
    out = nakt.report(labels=str(labels), images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                      runs=[str(t) for t in two_teachers], out=str(tmp_path / "report"), queue=5, progress=False)
    result = json.loads((out / "report.json").read_text())
    queue = result["queue"]
    assert sorted(queue) == sorted(labelset.read_manifest(labels)["cases"])  # every case, each once
    keys = [(-result["cases"][n]["disagreement"], result["cases"][n]["pixel_agreement"]) for n in queue]
    assert keys == sorted(keys) and keys[0] != keys[-1]  # most disputed first, and the cases do differ
    manifest = labelset.read_manifest(labels)["cases"]
    first = manifest[queue[0]]["agreement"]["pairwise_dice"]
    assert result["cases"][queue[0]]["disagreement"] == pytest.approx(1 - first)
    page = (out / "index.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert len([s for s in sources if s.startswith("cases/")]) == 5  # the drawn part of the queue, in order
    assert all((out / s).is_file() and (out / s).stat().st_size > 0 for s in sources)
    drawn = [re.search(r"cases/(.+)\.png", s).group(1) for s in sources if s.startswith("cases/")]
    assert drawn == queue[:5]
    assert {"plots/agreement.png", "plots/dice_vs_truth.png"} <= set(sources)
    assert sum(s.startswith("plots/training_") for s in sources) == 2
    assert all(0 <= t["sensitivity"] <= 1 for t in result["teachers"])  # STAPLE from the stored teacher probs
    assert all(0 <= result["cases"][n]["dice_vs_truth"] <= 1 for n in queue)
    # accuracy against cost: each run, and the ensemble the label set's teachers (the same two runs) make
    assert "plots/accuracy_vs_cost.png" in sources
    points = {p["name"]: p for p in result["cost"]}
    ensemble = points.pop("ensemble (2 teachers)")
    assert sorted(points) == sorted(t.name for t in two_teachers)
    assert ensemble["cost"]["flops"] == sum(p["cost"]["flops"] for p in points.values())
    assert ensemble["cost"]["parameters"] == sum(p["cost"]["parameters"] for p in points.values())
    assert ensemble["accuracy"] == pytest.approx(np.mean([result["cases"][n]["dice_vs_truth"] for n in queue]))
    for teacher in two_teachers:
        own = nakt.evaluate(model=str(teacher), images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                            cases=f"{split}:transferal", out=str(tmp_path / f"eval_{teacher.name}"), hd95=False,
                            progress=False)
        assert points[teacher.name]["accuracy"] == pytest.approx(own["mean"]["dice"])


def test_report_of_a_folder_that_is_no_label_set_is_one_line(synthetic2d, tmp_path, capsys):
    code = main(["report", "--labels", str(synthetic2d / "masks"), "--images", str(synthetic2d / "images"),
                 "--out", str(tmp_path / "report"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a label set" in err[0] and not (tmp_path / "report").exists()


def test_report_shows_3d_cases_as_three_orthogonal_slices(tmp_path):
    import json

    import nibabel as nib

    rng = np.random.default_rng(0)
    for folder in ("img", "msk"):
        (tmp_path / folder).mkdir()
    for i in range(3):
        mask = np.zeros((20, 18, 16), np.uint8)
        mask[5 + i:14, 4:12, 3 + i:11] = 1
        image = mask * 2.0 + rng.normal(size=mask.shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(tmp_path / "img" / f"v{i}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "msk" / f"v{i}.nii.gz"))
    common = dict(images=str(tmp_path / "img"), progress=False, device="cpu")
    teachers = [str(nakt.train(model="monai:UNet", masks=str(tmp_path / "msk"), size=[32], epochs=1, seed=seed,
                               val_fraction=0, out=str(tmp_path / f"t{seed}"), **common)) for seed in (0, 1)]
    labels = nakt.label(teacher=teachers, out=str(tmp_path / "labels"), **common)
    out = nakt.report(labels=str(labels), images=str(tmp_path / "img"), out=str(tmp_path / "report"), progress=False)
    result = json.loads((out / "report.json").read_text())
    for name in result["queue"]:
        pictures = result["cases"][name]["pictures"]
        assert [p.rsplit("_", 1)[1] for p in pictures] == ["axis0.png", "axis1.png", "axis2.png"]
        assert all((out / p).is_file() for p in pictures)


def test_self_training_adds_the_last_student_and_drops_unstable_and_disputed_cases(synthetic2d, two_teachers,
                                                                                   tmp_path):
    """Round 1 adds round 0's student to the teachers, with strong augmentation; each round's student trains on
    the cases the filter keeps: not the quarter the teachers disagree on most, nor (from round 1) those whose fused
    masks moved from the previous round's (foreground Dice below 0.9), both recomputed here from the label sets;
    finished rounds are kept when the recipe runs again."""
    from nakt.recipes import self_training

    split = synthetic2d / "splits.json"
    recipe = dict(rounds=2, cases=f"{split}:transferal", label_options={"device": "cpu"}, min_stability=0.9,
                  drop_disputed=0.25, train_options={"size": [32], "epochs": 3, "lr": 1e-2, "device": "cpu"},
                  progress=False)
    students = self_training([str(t) for t in two_teachers], str(synthetic2d / "images"), "monai:UNet",
                             str(tmp_path / "st"), **recipe)
    assert students == [tmp_path / "st" / "round_0" / "student", tmp_path / "st" / "round_1" / "student"]
    specs = [[t["spec"] for t in labelset.read_manifest(tmp_path / "st" / f"round_{r}" / "labels")["teachers"]]
             for r in (0, 1)]
    assert specs == [[str(t) for t in two_teachers], [*map(str, two_teachers), str(students[0])]]
    training = rundir.read_config(students[1])[1]
    assert training["spatial_augment"] and training["augment"] and training["soft_targets"]
    unstable_anywhere = 0
    for r, student in enumerate(students):
        labels = tmp_path / "st" / f"round_{r}" / "labels"
        cases = labelset.read_manifest(labels)["cases"]
        ranked = sorted(cases, key=lambda n: (cases[n]["agreement"]["pairwise_dice"], n))
        dropped = set(ranked[:len(cases) // 4])
        if r:
            before = tmp_path / "st" / f"round_{r - 1}" / "labels" / "masks"
            moved = {n for n in cases if dice((read_mask(labels / "masks" / f"{n}.png") > 0).astype(int),
                                              (read_mask(before / f"{n}.png") > 0).astype(int), 2) < 0.9}
            unstable_anywhere += len(moved - dropped)
            dropped |= moved
        training = rundir.read_config(student)[1]
        assert sorted(training["trained_on"] + training["validated_on"]) == sorted(set(cases) - dropped), r
        recorded = json.loads((tmp_path / "st" / f"round_{r}" / "filter.json").read_text())
        assert set(recorded["dropped"]) == dropped
    assert unstable_anywhere > 0  # the stability rule dropped something the disagreement rule did not
    weights = (students[1] / "model.safetensors").stat().st_mtime_ns
    self_training([str(t) for t in two_teachers], str(synthetic2d / "images"), "monai:UNet", str(tmp_path / "st"),
                  **recipe)
    assert (students[1] / "model.safetensors").stat().st_mtime_ns == weights  # finished rounds are kept


def test_fusion_ceiling_scores_every_weighting_as_evaluate_does(synthetic2d, two_teachers, tmp_path):
    """benchmarks/fusion_ceiling.py: every grid weighting's Dice is what numpy computes here from the stored
    probabilities, the grid's corners are the single teachers (scored as `nakt evaluate` scores their label
    sets), and the best is the grid's maximum."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fusion_ceiling import fusion_ceiling

    split = synthetic2d / "splits.json"
    common = dict(images=str(synthetic2d / "images"), cases=f"{split}:transferal", progress=False)
    # fp32, so that the rounding below is fp32's on every CPU: with bf16 labels (--precision auto on a CPU with
    # AVX512-BF16) the two scorings differed by 0.0030 on one teacher, just over the tolerance
    sets = [nakt.label(teacher=[str(t)], out=str(tmp_path / f"labels{i}"), device="cpu", precision="fp32", **common)
            for i, t in enumerate(two_teachers)]
    result = fusion_ceiling(sets, str(synthetic2d / "masks"), common["cases"], step=0.25)
    assert [g["weights"] for g in result["grid"]] == [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0)]
    scored = [nakt.evaluate(masks=str(synthetic2d / "masks"), pred=str(s / "masks"), out=str(tmp_path / f"ev{i}"),
                            hd95=False, **common)["mean"]["dice"] for i, s in enumerate(sets)]
    # probabilities are stored in steps of 1/256: a pixel at exactly 0.5 may fall on the other side (one pixel
    # moves a case's Dice by ~0.002, the mean over 12 cases by ~0.0002)
    assert result["single"] == pytest.approx(scored, abs=3e-3)
    assert [result["grid"][-1]["dice"], result["grid"][0]["dice"]] == result["single"]
    assert result["cases"] == 12

    # each weighting recomputed independently: argmax of w0 * p0 + w1 * p1 (exact ties to the background), the
    # foreground Dice of each case against the truth, the mean over the cases
    names = json.loads(split.read_text())["transferal"]
    truth = read_label_maps([synthetic2d / "masks" / f"{n}.png" for n in names], [0, 255])
    probs = [[labelset.read_probs(labels, n).astype(np.float64) for n in names] for labels in sets]
    by_hand = [np.mean([dice(np.argmax(w0 * a + w1 * b, axis=0), t, 2) for a, b, t in zip(*probs, truth)])
               for w0, w1 in (g["weights"] for g in result["grid"])]
    assert [g["dice"] for g in result["grid"]] == pytest.approx(by_hand, abs=1e-6)
    assert len({round(d, 4) for d in by_hand}) >= 3  # the weights matter here: a rule ignoring them is seen
    best = int(np.argmax(by_hand))
    assert result["best"] == {"weights": result["grid"][best]["weights"], "dice": pytest.approx(by_hand[best])}
    assert set(result["rules"]) == set(FUSIONS) and result["rules"]["vote"] == result["vote"]
    # two teachers: the mean is the grid's middle weighting (exact ties go to the background in both)
    assert result["rules"]["mean"] == pytest.approx(result["grid"][2]["dice"], abs=1e-9)
