"""Teachers with different label spaces: mapped by value and by name, partial teachers fused per class."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nakt
from nakt.errors import NaktError
from nakt.fusion import fuse, fuse_partial
from nakt.io.images import read_mask
from nakt.labelspace import LabelMap, unify

CLASSES = {"liver": 1, "spleen": 2, "kidney": 3}


def test_binary_teachers_with_different_values_fuse_without_a_map():
    """{0, 1} (nnU-Net style, named) and two {0, 255} teachers: background + one foreground is unambiguous; the
    target keeps the value most teachers use and the name the named teacher gives."""
    space = unify([("nnunet:a", [0, 1], ["background", "lesion"]), ("run", [0, 255], ["0", "255"]),
                   ("onnx:c", [0, 255], ["0", "255"])])
    assert space.values == [0, 255] and space.names == ["background", "lesion"]
    assert [m.target_index for m in space.mappings] == [[0, 1]] * 3 and not space.partial
    assert space.record()["by_teacher"][0]["classes"] == {"0": 0, "1": 255}


def test_classes_are_matched_by_name_and_unknown_ones_are_partial():
    space = unify([("a", [0, 1, 2], ["background", "liver", "spleen"]),
                   ("b", [0, 1, 2], ["Background", "spleen", "kidney"])])
    assert space.names == ["background", "liver", "spleen", "kidney"] and space.values == [0, 1, 2, 3]
    assert space.mappings[1].target_index == [0, 2, 3]  # b's spleen (1) is a's spleen (2); kidney gets 3
    assert space.known.tolist() == [[True, True, True, False], [True, False, True, True]]
    assert space.record()["known_by"] == [2, 1, 2, 1]
    probs = np.array([[0.1], [0.2], [0.7]], np.float32)  # b's classes
    assert space.to_target(1, probs).ravel().tolist() == pytest.approx([0.1, 0.0, 0.2, 0.7])


def test_ambiguous_spaces_are_refused_naming_both_sides():
    with pytest.raises(NaktError) as err:
        unify([("run_a", [0, 1, 2], ["0", "1", "2"]), ("run_b", [0, 255], ["0", "255"])])
    text = str(err.value)
    assert "\n" not in text and "run_a" in text and "run_b" in text and "[0, 255]" in text and "[0, 1, 2]" in text
    with pytest.raises(NaktError, match="spleen"):  # one foreground each, but named as two different classes
        unify([("a", [0, 1], ["0", "1"]), ("b", [0, 1], ["background", "liver"]),
               ("c", [0, 255], ["background", "spleen"])])
    with pytest.raises(NaktError, match=r"class 3 \(kidney\) has no place in the target classes \{0: background, "
                                        r"1: liver\}"):
        unify([("b", [0, 3], ["background", "kidney"])], LabelMap(classes={0: "background", 1: "liver"}))


def test_a_label_map_maps_values_and_names_onto_the_target():
    space = unify([("nn", [0, 1], ["background", "tumour"]), ("run", [0, 255], ["0", "255"])],
                  LabelMap(classes={0: "background", 255: "lesion"}, map={"tumour": "lesion"}))
    assert space.values == [0, 255] and [m.target_index for m in space.mappings] == [[0, 1], [0, 1]]
    spec_map = unify([("nn", [0, 1], ["0", "1"]), ("run", [0, 255], ["0", "255"]), ("x", [0, 1, 2], ["0", "1", "2"])],
                     spec_maps=[{1: 255}, {}, {1: 255, 2: 255}])
    assert spec_map.values == [0, 255] and spec_map.mappings[2].target_index == [0, 1, 1]


METHODS = ["mean", "vote", "staple", "weighted", "trimmed-vote"]


@pytest.mark.parametrize("method", METHODS)
def test_partial_fusion_per_class_equals_fusing_only_the_knowing_teachers(method):
    """Each class's fused probability is the same rule applied to the teachers that know that class alone (a
    teacher that does not know it is not counted as 'background' there); the hard rules count a teacher for c
    where c is its own argmax."""
    rng = np.random.default_rng(0)
    known = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]], bool)  # K=4, C=4
    probs = rng.dirichlet(np.ones(4), size=(4, 6, 5)).transpose(0, 3, 1, 2).astype(np.float32)
    probs = np.where(known[:, :, None, None], probs, 0)
    probs[:, 0] = 1 - probs[:, 1:].sum(1)
    weights = [0.9, 0.5, 0.7, 0.8]
    fused, per_class = fuse_partial(probs, known, method, weights)
    for c in range(1, 4):
        knowing = np.flatnonzero(known[:, c])
        if method in ("vote", "staple", "trimmed-vote"):
            evidence = (probs[knowing].argmax(1) == c).astype(np.float32)
        else:
            evidence = probs[knowing, c]
        expected = fuse(np.stack([1 - evidence, evidence], axis=1), method, [weights[k] for k in knowing])[1]
        np.testing.assert_allclose(per_class[c], expected, atol=1e-6)
    assert np.allclose(fused.sum(0), 1, atol=1e-5)
    background = np.maximum(1 - per_class[1:].sum(0), 0)
    np.testing.assert_array_equal(fused.argmax(0), np.concatenate([background[None], per_class[1:]]).argmax(0))


@pytest.mark.parametrize("method", METHODS)
def test_partial_fusion_keeps_each_teachers_own_prediction(method):
    """A teacher alone on its classes keeps its argmax, also where its winning class has less than 0.5 (the
    pixels between two of its classes): teacher A knows classes 1 and 2, B knows 3; B sees background there."""
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(3), size=(8, 8)).transpose(2, 0, 1).astype(np.float32)  # [3, 8, 8], often < 0.5
    b = np.stack([np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))])
    probs = np.stack([np.concatenate([a, np.zeros((1, 8, 8))]), b]).astype(np.float32)
    known = np.array([[1, 1, 1, 0], [1, 0, 0, 1]], bool)
    assert (a.max(0) < 0.5).any()
    np.testing.assert_array_equal(fuse_partial(probs, known, method)[0].argmax(0), a.argmax(0))
    if method == "mean":  # one teacher that knows every class: returned as it is
        np.testing.assert_allclose(fuse_partial(probs[:1, :3], known[:1, :3], method)[0], a, atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "weighted"])
def test_partial_fusion_of_teachers_that_know_everything_is_the_ordinary_fusion(method):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=(3, 5, 5)).transpose(0, 3, 1, 2).astype(np.float32)
    fused = fuse_partial(probs, np.ones((3, 3), bool), method, [0.2, 0.3, 0.5])[0]
    np.testing.assert_allclose(fused, fuse(probs, method, [0.2, 0.3, 0.5]), atol=1e-5)


def write_partial_teachers(root: Path, rng) -> tuple[Path, dict, np.ndarray]:
    """Images and three mask teachers over the same 3-organ truth, each knowing two organs: A liver + spleen,
    B spleen + kidney, C liver + kidney, each with its own values (A 0/1/2, B 0/10/20, C 0/7/9), its errors
    drawn independently."""
    images = root / "images"
    images.mkdir(parents=True)
    truth = np.zeros((8, 32, 32), np.uint8)
    truth[:, 2:12, 2:12], truth[:, 14:24, 4:14], truth[:, 8:20, 18:30] = 1, 2, 3  # liver, spleen, kidney
    teachers = {"A": {"liver": 1, "spleen": 2}, "B": {"spleen": 10, "kidney": 20}, "C": {"liver": 7, "kidney": 9}}
    specs = {}
    for name, own in teachers.items():
        folder = root / name
        folder.mkdir()
        for i in range(len(truth)):
            noisy = np.where(rng.random(truth[i].shape) < 0.15, rng.integers(0, 4, truth[i].shape), truth[i])
            noisy = noisy.astype(np.uint8)
            mask = np.zeros_like(noisy)
            for organ, value in own.items():
                mask[noisy == CLASSES[organ]] = value
            Image.fromarray(mask).save(folder / f"case{i}.png")
        labels = ",".join(["0:background"] + [f"{v}:{o}" for o, v in own.items()])
        specs[name] = f"masks:{folder}?labels={labels}"
    for i in range(len(truth)):
        Image.fromarray((truth[i] * 60 + rng.integers(0, 30, truth[i].shape)).astype(np.uint8)).save(
            images / f"case{i}.png")
    return images, specs, truth


def test_partial_teachers_fuse_into_the_union_and_a_student_learns_it(tmp_path):
    """Three partial teachers with three value codes, matched by name from their specs: the label set holds the
    union (4 classes, each known by 2 teachers), each pixel is what fusing the knowing teachers per class gives
    (computed here from the masks), and a student trained on it segments all three organs."""
    rng = np.random.default_rng(0)
    images, specs, truth = write_partial_teachers(tmp_path, rng)
    out = nakt.label(teacher=list(specs.values()), images=str(images), out=str(tmp_path / "labels"), fusion="mean",
                     progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == ["background", "liver", "spleen", "kidney"]
    assert manifest["label_values"] == [0, 1, 2, 20]  # names keep their first teacher's value
    assert manifest["label_mapping"]["known_by"] == [3, 2, 2, 2]
    own_values = {"A": [0, 1, 2, 0], "B": [0, 0, 10, 20], "C": [0, 7, 0, 9]}  # per target class, 0: unknown
    for i in range(len(truth)):
        masks = {k: np.asarray(Image.open(tmp_path / k / f"case{i}.png")) for k in specs}
        per_class = np.zeros((4, *truth[i].shape))
        for c in range(1, 4):
            knowing = [k for k in specs if own_values[k][c]]
            per_class[c] = np.mean([masks[k] == own_values[k][c] for k in knowing], axis=0)
        per_class[0] = np.maximum(1 - per_class[1:].sum(0), 0)  # background: what the classes leave
        expected = per_class.argmax(0)  # ties: background, then the lower class
        written = read_mask(out / "masks" / f"case{i}.png")
        np.testing.assert_array_equal(written, np.array([0, 1, 2, 20])[expected])
    student = nakt.train(model="monai:UNet", images=str(images), masks=str(out), out=str(tmp_path / "student"),
                         size=[32], epochs=15, lr=1e-2,
                         val_fraction=0, progress=False, precision="fp32")
    card = json.loads((student / "config.json").read_text())
    assert card["label_values"] == [0, 1, 2, 20] and card["class_names"] == ["background", "liver", "spleen", "kidney"]
    pred = nakt.predict(model=str(student), images=str(images), out=str(tmp_path / "pred"), progress=False)
    dices = []
    for c, value in ((1, 1), (2, 2), (3, 20)):
        p = np.stack([read_mask(pred / f"case{i}.png") == value for i in range(len(truth))])
        t = truth == c
        dices.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    # floor: a student that misses a class (or predicts background only) scores 0 on it
    assert min(dices) > 0.5, dices


def test_cli_refuses_an_ambiguous_mapping_in_one_line(tmp_path):
    rng = np.random.default_rng(1)
    images, specs, _ = write_partial_teachers(tmp_path, rng)
    plain = [s.split("?")[0] for s in specs.values()]  # values only: {0,1,2} vs {0,10,20}, no names
    result = subprocess.run([sys.executable, "-m", "nakt", "label", "--teacher", plain[0], "--teacher", plain[1],
                             "--images", str(images), "--out", str(tmp_path / "labels"), "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and plain[0] in lines[0] and plain[1] in lines[0], result.stderr
    assert not (tmp_path / "labels").exists()


def test_report_shows_which_teacher_knew_which_class(tmp_path):
    rng = np.random.default_rng(2)
    images, specs, _ = write_partial_teachers(tmp_path, rng)
    labels = nakt.label(teacher=list(specs.values()), images=str(images), out=str(tmp_path / "labels"),
                        save_teacher_probs=True, progress=False)
    out = nakt.report(labels=str(labels), images=str(images), out=str(tmp_path / "report"), progress=False)
    classes = json.loads((out / "report.json").read_text())["classes"]
    assert [c["name"] for c in classes] == ["background", "liver", "spleen", "kidney"]
    assert [c["known_by"] for c in classes[1:]] == [[specs["A"], specs["C"]], [specs["A"], specs["B"]],
                                                    [specs["B"], specs["C"]]]
    # the knowing teachers see the same organ with independent 15% noise (Dice about 0.7 between them); counting
    # a teacher that does not know the class would bring in pairs of Dice 0 (a mean of about 0.23)
    assert all(0.5 < c["teachers_dice"] < 1 for c in classes[1:]), classes
    assert "which teacher knew what" in (out / "index.html").read_text()


def test_label_map_file_through_the_cli(tmp_path):
    """--label-map: a teacher without names mapped by value onto named target classes; a class the map leaves
    without a place is refused in one line naming the teacher, its class and the target's classes."""
    rng = np.random.default_rng(3)
    images, specs, _ = write_partial_teachers(tmp_path, rng)
    unnamed_b = specs["B"].split("?")[0]  # values 0/10/20: spleen, kidney
    label_map = tmp_path / "map.yaml"
    label_map.write_text("classes: {0: background, 1: liver, 2: spleen, 3: kidney}\n"
                         f"teachers: {{'{unnamed_b}': {{10: 2, 20: kidney}}}}\n")
    out = tmp_path / "labels"
    result = subprocess.run([sys.executable, "-m", "nakt", "label", "--teacher", specs["A"], "--teacher", unnamed_b,
                             "--label-map", str(label_map), "--images", str(images), "--out", str(out),
                             "--fusion", "mean", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_values"] == [0, 1, 2, 3] and manifest["class_names"][3] == "kidney"
    assert [t["classes"] for t in manifest["label_mapping"]["by_teacher"]] == [{"0": 0, "1": 1, "2": 2},
                                                                               {"0": 0, "10": 2, "20": 3}]
    assert manifest["label_mapping"]["known_by"] == [2, 1, 2, 1]
    label_map.write_text("classes: {0: background, 1: liver, 2: spleen}\n")
    result = subprocess.run([sys.executable, "-m", "nakt", "label", "--teacher", specs["A"], "--teacher", unnamed_b,
                             "--label-map", str(label_map), "--images", str(images), "--out", str(tmp_path / "bad"),
                             "--no-progress"], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert unnamed_b in lines[0] and "class 10" in lines[0] and "{0: background, 1: liver, 2: spleen}" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_a_label_set_is_not_resumed_with_another_mapping(tmp_path):
    rng = np.random.default_rng(4)
    images, specs, _ = write_partial_teachers(tmp_path, rng)
    out = tmp_path / "labels"
    nakt.label(teacher=[specs["A"]], images=str(images), out=str(out), progress=False)
    renamed = specs["A"].replace("liver", "hepar")  # the same teacher (same files), its class 1 named otherwise
    with pytest.raises(NaktError, match="mapped or named otherwise"):
        nakt.label(teacher=[renamed], images=str(images), out=str(out), progress=False)


def write_partially_annotated(root: Path, rng, n: int = 12, kidney_only: int = 3) -> tuple[Path, Path, Path,
                                                                                         np.ndarray]:
    """Images of the 3-organ truth with masks in one value space (1 liver, 2 spleen, 3 kidney), partially
    annotated as pooled datasets are: the first `n - kidney_only` cases annotate liver and spleen (their kidney
    stored as background), the last `kidney_only` the kidney alone; annotated.csv says which."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    truth = np.zeros((n, 32, 32), np.uint8)
    truth[:, 2:12, 2:12], truth[:, 14:24, 4:14], truth[:, 8:20, 18:30] = 1, 2, 3
    rows = ["case,classes"]
    for i in range(n):
        Image.fromarray((truth[i] * 60 + rng.integers(0, 30, truth[i].shape)).astype(np.uint8)).save(
            images / f"case{i}.png")
        annotated = [3] if i >= n - kidney_only else [1, 2]
        Image.fromarray(np.where(np.isin(truth[i], annotated), truth[i], 0).astype(np.uint8)).save(
            masks / f"case{i}.png")
        rows.append(f"case{i},{';'.join(map(str, annotated))}")
    (root / "annotated.csv").write_text("\n".join(rows) + "\n")
    return images, masks, root / "annotated.csv", truth


@pytest.mark.parametrize("batch_dice", [False, True])
def test_marginal_loss_ignores_an_unannotated_class_and_equals_the_full_loss_otherwise(batch_dice):
    """Merging the unannotated classes into background: swapping a pixel's background and unannotated-class
    logits costs nothing; with every class annotated the loss is the ordinary one (per image and batch Dice)."""
    from nakt.train.losses import SoftDiceCELoss

    loss = SoftDiceCELoss(batch_dice=batch_dice)
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    target = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 8, 8), generator=gen), 4).permute(0, 3, 1, 2)
    target = target.float()
    logits = 4 * target + torch.randn(2, 4, 8, 8, generator=gen)  # mostly right
    known = torch.tensor([[True, True, True, False], [True, True, True, True]])
    swapped = logits.clone()
    swapped[0, [0, 3]] = logits[0, [3, 0]]  # sample 0 calls its background "kidney" (class 3), unannotated there
    assert abs(loss(logits, target, known=known) - loss(swapped, target, known=known)) < 1e-6
    assert loss(swapped, target) - loss(logits, target) > 0.5  # the ordinary loss punishes it
    everything = torch.ones(2, 4, dtype=torch.bool)
    weight = torch.rand(2, 1, 8, 8, generator=gen)
    for w in (None, weight):
        assert abs(loss.marginal(logits, target, everything, w) - loss(logits, target, w)) < 1e-6


def test_a_student_learns_every_class_from_partially_annotated_masks(tmp_path):
    """Nine cases annotate liver + spleen, three the kidney alone (elsewhere the kidney is stored as background).
    Trained with --annotated-classes (the marginal loss), the student segments all three organs; the same
    training without it learns the kidney as background, where 9 of 12 masks put it. Validation scores each
    case on its annotated classes (the kidney a liver + spleen case shows is not a false positive)."""
    images, masks, annotated, truth = write_partially_annotated(tmp_path, np.random.default_rng(0))

    def organ_dice(annotated_classes):
        out = tmp_path / ("marginal" if annotated_classes else "plain")
        student = nakt.train(model="monai:UNet", images=str(images), masks=str(masks), out=str(out), size=[32],
                             epochs=15, lr=1e-2, val_images=str(images), progress=False, precision="fp32",
                             annotated_classes=annotated_classes)
        pred = nakt.predict(model=str(student), images=str(images), out=str(out / "pred"), progress=False)
        predicted = np.stack([read_mask(pred / f"case{i}.png") for i in range(len(truth))])
        validation = json.loads((student / "metrics.json").read_text())["history"][-1]["val_score"]
        return [2 * ((predicted == c) & (truth == c)).sum() / ((predicted == c).sum() + (truth == c).sum())
                for c in (1, 2, 3)], validation

    (marginal, marginal_validation), (plain, _) = organ_dice(str(annotated)), organ_dice(None)
    # floor: a student that misses a class scores 0 on it
    assert min(marginal) > 0.7, marginal
    assert marginal[2] - plain[2] > 0.3, (marginal, plain)
    # scored on all classes, the 9 liver + spleen cases would count the kidney found as a false class (<= 0.67)
    assert marginal_validation > 0.85, marginal_validation


def test_annotated_classes_refusals_name_the_file_and_the_problem(tmp_path):
    images, masks, annotated, _ = write_partially_annotated(tmp_path, np.random.default_rng(0), n=4, kidney_only=1)
    rows = annotated.read_text().splitlines()
    for bad, expected in ((rows + ["case9,1"], "case 'case9' is not among"), (rows[:1] + ["case0,4"] + rows[2:],
                          "class '4' is not one of"), (rows[:1] + ["case0,1"] + rows[2:], "holds label value 2")):
        annotated.write_text("\n".join(bad) + "\n")
        with pytest.raises(NaktError, match=expected):
            nakt.train(model="monai:UNet", images=str(images), masks=str(masks), out=str(tmp_path / "run"),
                       size=[32], epochs=1, progress=False, annotated_classes=str(annotated))
        assert not (tmp_path / "run").exists()
