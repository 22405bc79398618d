"""Bad input across every verb: one line on stderr naming the file or option, exit status 2, no traceback, and
nothing half-written: a folder that did not exist still does not, and a folder that did is unchanged."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nakt
from nakt.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic2d, unet_teacher):
    """A finished tiny run (the shared teacher: 3 epochs), an unfinished copy, and folders a user owns."""
    root = tmp_path_factory.mktemp("errors")
    data = synthetic2d
    run = unet_teacher
    unfinished = root / "unfinished"
    shutil.copytree(run, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "complete": False}))
    true_masks = root / "true_masks_copy"
    shutil.copytree(data / "masks", true_masks)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for p in sorted((data / "images").glob("*.png")):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photos / f"{p.stem}.jpg")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.json").write_text('{"what": "my own config"}')
    evaluated = root / "evaluated"
    nakt.evaluate(model=str(run), images=str(data / "images"), masks=str(data / "masks"),
                  cases=f"{data / 'splits.json'}:test", out=str(evaluated), progress=False)
    pickled = root / "pickled.pt"
    torch.save({"weights": torch.zeros(1), "code": Path("x")}, pickled)  # a non-tensor object: refused
    yaml_dir = root / "yaml"
    yaml_dir.mkdir()
    for name, text in {"epochs_word.yaml": "epochs: two\n", "lr_list.yaml": "lr: [1, 2]\n",
                       "unknown.yaml": "epoch: 3\n", "broken.yaml": "size: [64\n", "batch_bad.yaml": "batch_size: -3\n",
                       "list.yaml": "- a\n- b\n"}.items():
        (yaml_dir / name).write_text(text)
    return {"data": data, "run": run, "unfinished": unfinished, "true_masks": true_masks, "photos": photos,
            "foreign": foreign, "evaluated": evaluated, "pickled": pickled, "yaml": yaml_dir, "root": root}


def _snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# (verb and flags, text the error must contain, the output that must stay as it was); {names} are filled from
# the `world` fixture, {new} is a folder that does not exist yet.
SEG_TRAIN = "train --model monai:UNet --images {data}/images --masks {data}/masks --size 32 --no-progress"
MATRIX = [
    (SEG_TRAIN + " --out {new} --epochs -1", "--epochs", "{new}"),
    (SEG_TRAIN + " --out {new} --epochs 0", "--epochs", "{new}"),
    (SEG_TRAIN + " --out {new} --batch-size 0", "--batch-size", "{new}"),
    (SEG_TRAIN + " --out {new} --val-fraction 1.5", "--val-fraction", "{new}"),
    (SEG_TRAIN + " --out {new} --lr 0", "--lr", "{new}"),
    (SEG_TRAIN + " --out {new} --device gpu", "--device", "{new}"),
    (SEG_TRAIN + " --out {new} --device {missing_gpu}", "--device", "{new}"),
    (SEG_TRAIN + " --out {new} --orientation XYZ", "--orientation", "{new}"),
    (SEG_TRAIN + " --out {new} --epochs two", "--epochs", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/epochs_word.yaml", "epochs_word.yaml: epochs", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/lr_list.yaml", "lr_list.yaml: lr", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/batch_bad.yaml", "batch_bad.yaml: batch_size", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/unknown.yaml", "unknown.yaml: unknown key 'epoch'", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/broken.yaml", "broken.yaml: invalid YAML", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/list.yaml", "list.yaml", "{new}"),
    (SEG_TRAIN + " --out {new} --config {yaml}/absent.yaml", "absent.yaml: config file not found", "{new}"),
    ("train --model smp:Nope/resnet18 --images {data}/images --masks {data}/masks --out {new}", "'nope'", "{new}"),
    ("train --model unet --images {data}/images --masks {data}/masks --out {new}", "unet", "{new}"),
    ("train --model monai:UNet --images {root}/absent --masks {data}/masks --out {new}", "absent", "{new}"),
    ("train --model monai:UNet --images {data}/images --masks {foreign} --out {new}", "no mask for case", "{new}"),
    (SEG_TRAIN + " --masks {photos} --out {new}", "JPEG", "{new}"),
    (SEG_TRAIN + " --out {foreign}", "foreign", "{foreign}"),
    (SEG_TRAIN + " --out {foreign} --overwrite", "not a nakt run directory", "{foreign}"),
    (SEG_TRAIN + " --out {foreign}/notes.txt", "notes.txt", "{foreign}"),
    (SEG_TRAIN + " --out {run}", "holds a nakt run directory already", "{run}"),
    ("train --out {foreign} --resume", "nothing to resume", "{foreign}"),
    ("train --out {run} --resume", "finished already", "{run}"),
    (SEG_TRAIN + " --out {unfinished} --resume --epochs 5", "--epochs 5 differs", "{unfinished}"),
    (SEG_TRAIN + " --out {new} --resume --overwrite", "--resume", "{new}"),
    (SEG_TRAIN + " --out {new} --pretrained {pickled}", "pickled.pt: holds pickled Python objects", "{new}"),
    (SEG_TRAIN + " --out {new} --init {unfinished}", "did not finish", "{new}"),
    (SEG_TRAIN + " --out {new} --annotated-classes {root}/absent.csv", "absent.csv: cannot read the annotated",
     "{new}"),
    ("finetune --model smp:Unet/resnet18 --images {data}/images --masks {data}/masks --out {new}",
     "continues a run directory", "{new}"),
    ("finetune --model {unfinished} --images {data}/images --masks {data}/masks --out {new} --no-progress",
     "--resume", "{new}"),
    ("label --teacher {run} --teacher {run} --images {data}/images --out {new} --fusion weighted --weights -1 2",
     "--weights", "{new}"),
    ("label --teacher {run} --teacher {run} --images {data}/images --out {new} --weights 1", "--weights", "{new}"),
    ("label --teacher {run} --images {data}/images --out {new} --fusion nope", "--fusion", "{new}"),
    ("label --teacher {unfinished} --images {data}/images --out {new}", "nakt train --out", "{new}"),
    ("label --teacher {root}/absent_run --images {data}/images --out {new}", "absent_run", "{new}"),
    ("label --teacher {run} --images {data}/images --out {foreign} --no-progress", "foreign", "{foreign}"),
    ("label --teacher {run} --images {data}/images --out {new} --task classification", "segmentation", "{new}"),
    ("predict --model {run} --images {data}/images --out {true_masks} --no-progress", "true_masks_copy",
     "{true_masks}"),
    ("predict --model {run} --images {data}/images --out {new} --task classification", "not classification",
     "{new}"),
    ("predict --model {unfinished} --images {data}/images --out {new}", "did not finish", "{new}"),
    ("evaluate --pred {photos} --images {data}/images --masks {data}/masks --out {new} --no-progress", "JPEG",
     "{new}"),
    ("evaluate --model {run} --images {data}/images --masks {data}/masks --out {evaluated} --no-progress",
     "holds a nakt evaluation folder already", "{evaluated}"),
    ("evaluate --model {run} --images {data}/images --masks {data}/masks --out {foreign}", "foreign", "{foreign}"),
    ("evaluate --model {run} --pred {photos} --images {data}/images --masks {data}/masks --out {new}",
     "--model RUN or --pred DIR", "{new}"),
    ("evaluate --model {run} --images {data}/images --masks {data}/masks --out {new} --steps 0", "--steps",
     "{new}"),
    ("evaluate --model {run} --images {data}/images --out {new}", "--masks", "{new}"),
    ("evaluate --pred {data}/masks --images {data}/images --masks {data}/masks --out {new} "
     "--task classification", "--pred", "{new}"),
    ("distill --model monai:UNet --images {data}/images --size 32 --out {new}", "needs --teacher", "{new}"),
    ("distill --model monai:UNet --teacher {unfinished} --images {data}/images --size 32 --out {new}",
     "did not finish", "{new}"),
    ("distill --model monai:UNet --teacher {run} --images {data}/images --size 32 --alpha 2 --out {new}", "--alpha",
     "{new}"),
    ("report --labels {data}/masks --images {data}/images --out {new} --no-progress", "not a label set", "{new}"),
    ("export --model {unfinished} --format onnx --out {new}", "did not finish", "{new}"),
    ("export --model {run} --format onnx --opset 0 --out {new}", "--opset", "{new}"),
    ("export-nnunet --labels {data}/masks --images {data}/images --out {new}", "DatasetNNN_Name", "{new}"),
    ("export-nnunet --labels {data}/masks --images {data}/images --out {root}/Dataset901_Tiny", "manifest.json",
     "{root}/Dataset901_Tiny"),
    ("demo --out {foreign}", "foreign", "{foreign}"),
    ("demo --out {new} --epochs 0", "--epochs", "{new}"),
]


@pytest.mark.parametrize("argv, expected, output", MATRIX, ids=[f"{i:02d}" for i in range(len(MATRIX))])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, capsys, argv, expected, output):
    names = {k: str(v) for k, v in world.items()}
    names["new"] = str(tmp_path / "new_out")
    names["missing_gpu"] = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    out = Path(output.format(**names))
    before = _snapshot(out)
    capsys.readouterr()
    code = main(argv.format(**names).split())
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert expected.format(**names) in err, err
    assert _snapshot(out) == before, f"{out} changed"


def test_every_verb_of_the_nakt_command_has_bad_input_here():
    """The verbs are read from the parser `nakt` runs, not from this table: a verb added to the CLI without a
    case above fails here."""
    import argparse

    from nakt.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    covered = {argv.split()[0] for argv, _, _ in MATRIX}
    assert len(verbs) >= 10 and set(verbs) == covered, (set(verbs) - covered, covered - set(verbs))


def test_a_full_disk_is_one_line_and_leaves_no_summary(world, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))

    monkeypatch.setattr(os, "replace", full)
    data = world["data"]
    code = main(["evaluate", "--model", str(world["run"]), "--images", f"{data}/images", "--masks",
                 f"{data}/masks", "--out", str(tmp_path / "eval"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "No space left on device" in err, err
    assert not (tmp_path / "eval" / "summary.json").exists()
    assert not list((tmp_path / "eval").glob(".tmp-*")) if (tmp_path / "eval").exists() else True


def test_yaml_scalars_where_lists_are_expected_are_taken_as_one_item_lists(world, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("size: 32\nepochs: 1\nval_fraction: 0\nprogress: false\n")
    data = world["data"]
    run = nakt.train(model="monai:UNet", images=str(data / "images"), masks=str(data / "masks"),
                     cases=f"{data / 'splits.json'}:teacher_val", out=str(tmp_path / "r"), config=str(config))
    assert json.loads((run / "config.json").read_text())["size"] == [32]
