"""Teachers of every kind meet in one interface: predictions on disk (masks:, probs:) fuse with networks, label
spaces are reconciled by value, and predict/evaluate accept every spec label accepts."""

import json

import numpy as np
import pytest
from PIL import Image

import nakt
from nakt.cli import main


@pytest.fixture(scope="module")
def net_run(unet_teacher):
    return unet_teacher


def _cases(synthetic2d, split="transferal"):
    return f"{synthetic2d / 'splits.json'}:{split}"


def test_masks_teacher_scores_its_own_masks_perfectly(synthetic2d, tmp_path, capsys):
    assert main(["evaluate", "--model", f"masks:{synthetic2d / 'masks'}", "--images", str(synthetic2d / "images"),
                 "--masks", str(synthetic2d / "masks"), "--cases", _cases(synthetic2d, "test"), "--out",
                 str(tmp_path / "e"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["mean"]["dice"] == 1.0 and summary["label_values"] == [0, 255]


def test_three_kinds_of_teacher_fuse_with_staple(net_run, synthetic2d, tmp_path):
    images, cases = str(synthetic2d / "images"), _cases(synthetic2d)
    first = nakt.label(teacher=[str(net_run)], images=images, cases=cases, out=str(tmp_path / "net_labels"),
                       progress=False)
    specs = [str(net_run), f"masks:{synthetic2d / 'masks'}", f"probs:{first}"]
    fused = nakt.label(teacher=specs, images=images, cases=cases, out=str(tmp_path / "fused"), fusion="staple",
                       save_teacher_probs=True, progress=False)
    manifest = json.loads((fused / "manifest.json").read_text())
    assert [t["spec"] for t in manifest["teachers"]] == specs and manifest["label_values"] == [0, 255]
    some_case = json.loads((synthetic2d / "splits.json").read_text())["transferal"][0]
    record = manifest["cases"][some_case]
    assert len(record["staple"]["sensitivity"]) == 3
    # the probs: teacher is the net teacher's own output (stored as float16), the masks: teacher one-hot
    with np.load(fused / "probs" / f"{some_case}.npz") as z:
        teacher_probs = z["teacher_probs"].astype(np.float32)
    assert teacher_probs.shape == (3, 2, 48, 48)
    np.testing.assert_allclose(teacher_probs[2], teacher_probs[0], atol=2e-3)
    truth = np.asarray(Image.open(synthetic2d / "masks" / f"{some_case}.png")) > 0
    assert np.array_equal(teacher_probs[1][1] == 1, truth)
    mask = np.asarray(Image.open(fused / "masks" / f"{some_case}.png"))
    assert set(np.unique(mask)) <= {0, 255}


def test_label_spaces_are_mapped_by_value_or_refused(net_run, synthetic2d, tmp_path, capsys):
    ones, three = tmp_path / "masks01", tmp_path / "masks012"
    ones.mkdir()
    three.mkdir()
    for path in sorted((synthetic2d / "masks").glob("*.png")):
        binary = (np.asarray(Image.open(path)) > 0).astype(np.uint8)
        Image.fromarray(binary).save(ones / path.name)
        binary[:2, :2] = 2
        Image.fromarray(binary).save(three / path.name)
    # one foreground each: {0, 255} and {0, 1} fuse with no map, 1 counted as 255 (the target takes the value
    # most teachers use, the first teacher's on a tie); two teachers that agree give the 0/255 masks back
    cases = _cases(synthetic2d, "test")
    labels = nakt.label(teacher=[f"masks:{synthetic2d / 'masks'}", f"masks:{ones}"], cases=cases, fusion="mean",
                        images=str(synthetic2d / "images"), out=str(tmp_path / "binary"), progress=False)
    manifest = json.loads((labels / "manifest.json").read_text())
    assert manifest["label_values"] == [0, 255]
    assert manifest["label_mapping"]["by_teacher"][1]["classes"] == {"0": 0, "1": 255}
    for mask in sorted((labels / "masks").glob("*.png")):
        truth = np.asarray(Image.open(synthetic2d / "masks" / mask.name))
        np.testing.assert_array_equal(np.asarray(Image.open(mask)), truth)
    # {0, 1, 2} against {0, 255}, no names: ambiguous, refused in one line naming both sides, nothing written
    code = main(["label", "--teacher", str(net_run), "--teacher", f"masks:{three}", "--images",
                 str(synthetic2d / "images"), "--out", str(tmp_path / "l"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "[0, 1, 2]" in err and "[0, 255]" in err and str(three) in err, err
    assert not (tmp_path / "l").exists()
    # declared values in another order are the same space
    labels = nakt.label(teacher=[f"masks:{synthetic2d / 'masks'}?labels=255,0", str(net_run)],
                        images=str(synthetic2d / "images"), cases=cases, out=str(tmp_path / "ok"), progress=False)
    assert json.loads((labels / "manifest.json").read_text())["label_values"] == [0, 255]


def test_predict_from_a_label_sets_probabilities(net_run, synthetic2d, tmp_path):
    images, cases = str(synthetic2d / "images"), _cases(synthetic2d, "test")
    labels = nakt.label(teacher=[str(net_run)], images=images, cases=cases, out=str(tmp_path / "labels"),
                        progress=False)
    out = nakt.predict(model=f"probs:{labels}", images=images, cases=cases, out=str(tmp_path / "pred"),
                       progress=False)
    # stored probabilities are rounded to 1/256, which tips pixels within 1/512 of a tie; the teacher here is a
    # few epochs old and has many such pixels
    for mask in sorted((labels / "masks").glob("*.png")):
        same = np.asarray(Image.open(mask)) == np.asarray(Image.open(out / mask.name))
        assert same.mean() > 0.97, mask.name


def test_a_missing_case_in_a_disk_teacher_is_one_line(synthetic2d, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    first = sorted((synthetic2d / "masks").glob("*.png"))[0]
    (few / first.name).write_bytes(first.read_bytes())
    code = main(["label", "--teacher", f"masks:{few}", "--images", str(synthetic2d / "images"), "--out",
                 str(tmp_path / "l"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no mask for case" in err and "\n" not in err


def test_trimmed_vote_names_the_dropped_teacher(synthetic2d, tmp_path):
    """Three disk teachers, one of them the truth inverted: trimmed-vote drops it on every case with foreground,
    says so in the case records, and keeps the truth."""
    inverted = tmp_path / "inverted"
    inverted.mkdir()
    for path in sorted((synthetic2d / "masks").glob("*.png")):
        Image.fromarray(255 - np.asarray(Image.open(path))).save(inverted / path.name)
    truth = f"masks:{synthetic2d / 'masks'}"
    assert main(["label", "--teacher", truth, "--teacher", truth, "--teacher", f"masks:{inverted}", "--images",
                 str(synthetic2d / "images"), "--cases", _cases(synthetic2d), "--out", str(tmp_path / "l"),
                 "--fusion", "trimmed-vote", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert manifest["fusion"] == "trimmed-vote" and manifest["cases"]
    for case, record in manifest["cases"].items():
        assert record["dropped_teacher"] == 2, case
        fused = np.asarray(Image.open(tmp_path / "l" / "masks" / f"{case}.png"))
        assert np.array_equal(fused, np.asarray(Image.open(synthetic2d / "masks" / f"{case}.png"))), case


def test_a_binary_model_is_scored_against_masks_with_another_foreground_value(synthetic2d, tmp_path):
    """A 0/1 model (here predictions on disk) against the 0/255 truth it copies: Dice 1, not 0 (the two
    foregrounds are one class, as in labelling)."""
    ones = tmp_path / "masks01"
    ones.mkdir()
    for path in sorted((synthetic2d / "masks").glob("*.png")):
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(ones / path.name)
    summary = nakt.evaluate(model=f"masks:{ones}?labels=0,1", images=str(synthetic2d / "images"),
                            masks=str(synthetic2d / "masks"), cases=_cases(synthetic2d, "test"),
                            out=str(tmp_path / "eval"), progress=False)
    assert summary["mean"]["dice"] == 1.0 and summary["label_values"] == [0, 1]
