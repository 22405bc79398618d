"""Output folders behave like a lab tool's: nakt replaces only what it wrote, files follow the umask, every verb
ends with a summary line, --help shows defaults, and --task is accepted and inferred everywhere."""

import json
import os

import numpy as np
import pytest

import nakt
from nakt.cli import main
from nakt.io import outputs
from nakt.train import TrainOptions, infer_task


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic2d):
    old = os.umask(0o022)
    try:
        out = tmp_path_factory.mktemp("outputs") / "run"
        nakt.train(model="monai:UNet", images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                   out=str(out), cases=f"{synthetic2d / 'splits.json'}:teacher_val", size=[32], epochs=1,
                   val_fraction=0, progress=False)
    finally:
        os.umask(old)
    return out


def test_files_follow_the_umask(tiny_run):
    for name in ("config.json", "model.safetensors", "metrics.json"):
        assert oct((tiny_run / name).stat().st_mode & 0o777) == oct(0o644), name
    assert not (tiny_run / "training_state.pt").exists()  # removed once the run is complete
    assert json.loads((tiny_run / "config.json").read_text())["complete"] is True


def test_overwrite_replaces_only_nakts_own_files(tiny_run, synthetic2d, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "monai:UNet", "--images", str(synthetic2d / "images"), "--masks",
            str(synthetic2d / "masks"), "--cases", f"{synthetic2d / 'splits.json'}:teacher_val", "--size", "32",
            "--epochs", "1", "--val-fraction", "0", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"nakt train: wrote {run} (")
    (run / "notes.txt").write_text("my notes")
    first = (run / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 2  # without --overwrite the run is kept
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((run / "config.json").read_text())["training"]["seed"] == 1


def test_predict_overwrites_its_own_predictions_only(tiny_run, synthetic2d, tmp_path, capsys):
    splits = synthetic2d / "splits.json"
    out = tmp_path / "pred"
    base = ["predict", "--model", str(tiny_run), "--images", str(synthetic2d / "images"), "--out", str(out),
            "--no-progress"]
    assert main([*base, "--cases", f"{splits}:test"]) == 0
    test_cases = json.loads(splits.read_text())["test"]
    marker = json.loads((out / "predictions.json").read_text())
    assert marker["complete"] is True and marker["cases"] == test_cases
    (out / "README.txt").write_text("what these are")
    assert main([*base, "--cases", f"{splits}:teacher_val"]) == 2
    assert main([*base, "--cases", f"{splits}:teacher_val", "--overwrite"]) == 0
    written = sorted(p.stem for p in out.glob("*.png"))
    assert written == sorted(json.loads(splits.read_text())["teacher_val"])  # the old cases are gone
    assert (out / "README.txt").read_text() == "what these are"
    assert capsys.readouterr().out.strip().endswith(f"wrote predictions to {out}")


def test_label_and_evaluate_print_one_summary_line(tiny_run, synthetic2d, tmp_path, capsys):
    splits = synthetic2d / "splits.json"
    assert main(["label", "--teacher", str(tiny_run), "--teacher", str(tiny_run), "--images",
                 str(synthetic2d / "images"), "--cases", f"{splits}:test", "--out", str(tmp_path / "labels"),
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"nakt label: wrote {tmp_path / 'labels'} (6 cases, mean teacher agreement 1.0000")
    assert main(["evaluate", "--model", str(tiny_run), "--images", str(synthetic2d / "images"), "--masks",
                 str(synthetic2d / "masks"), "--cases", f"{splits}:test", "--out", str(tmp_path / "eval"),
                 "--task", "segmentation", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert line.startswith(f"nakt evaluate: dice {summary['mean']['dice']:.4f}") and "over 6 cases" in line


def test_an_unfinished_run_is_refused_by_evaluate_with_the_resume_command(tiny_run, synthetic2d, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "complete": False}))
    assert main(["evaluate", "--model", str(run), "--images", str(synthetic2d / "images"), "--masks",
                 str(synthetic2d / "masks"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "training did not finish (1 of 1 epochs done)" in err and f"nakt train --out {run} --resume" in err
    assert not (tmp_path / "e").exists()


def test_claim_output_rules(tmp_path):
    fresh = tmp_path / "a" / "b"
    assert outputs.claim_output(fresh, outputs.DEMO) is False and fresh.is_dir()
    (fresh / "demo.json").write_text('{"format": "nakt.demo/1"}')
    (fresh / "data").mkdir()
    (fresh / "mine.txt").write_text("x")
    with pytest.raises(nakt.NaktError, match="holds a nakt demo folder already"):
        outputs.claim_output(fresh, outputs.DEMO)
    assert outputs.claim_output(fresh, outputs.DEMO, resume=True) is True
    outputs.claim_output(fresh, outputs.DEMO, overwrite=True)
    assert sorted(p.name for p in fresh.iterdir()) == ["mine.txt"]
    with pytest.raises(nakt.NaktError, match="not a nakt run directory"):
        outputs.claim_output(fresh, outputs.RUN, overwrite=True)
    assert (fresh / "mine.txt").exists()


def test_help_shows_defaults_and_required_flags(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in text and "(required)" in text and "(default: RAS)" in text
    assert main(["finetune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 20)" in text and "(default: 0.0001)" in text
    for verb in ("label", "predict", "evaluate", "demo", "distill"):
        assert main([verb, "--help"]) == 0
        assert "--task" in capsys.readouterr().out or verb == "demo"


def test_task_is_inferred_and_checked(tiny_run, tmp_path):
    def options(**kw):
        return TrainOptions(images=str(tmp_path), out=str(tmp_path / "o"), **kw)

    assert infer_task(options(model="timm:resnet18")) == "classification"
    assert infer_task(options(model="smp:Unet/resnet18")) == "segmentation"
    assert infer_task(options(model=str(tiny_run))) == "segmentation"
    with pytest.raises(nakt.NaktError, match="is a classification model, not segmentation"):
        infer_task(options(model="timm:resnet18", task="segmentation"))


def test_demo_options_are_validated_before_anything_is_written(tmp_path):
    from nakt.demo import DemoOptions

    with pytest.raises(nakt.NaktError, match="--epochs"):
        DemoOptions(out=str(tmp_path / "d"), epochs=0)
    assert not (tmp_path / "d").exists()
    assert np.isfinite(DemoOptions(out=str(tmp_path / "d")).epochs)


def test_resume_of_a_run_stopped_in_its_first_epoch_starts_it_over(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "stopped"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "complete": False}))
    (run / "metrics.json").unlink()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["complete"] is True
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 1
    assert "nakt train: wrote" in capsys.readouterr().out


def test_export_through_the_cli_prints_its_line_and_refuses_foreign_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", "--model", str(tiny_run), "--format", "torchscript", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"nakt export: wrote {out} and its contract {out}.json (checked " \
                                               "against the run)"
    assert json.loads((tmp_path / "model.pt.json").read_text())["format"] == "nakt.export/1"
    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"not ours")
    assert main(["export", "--model", str(tiny_run), "--format", "onnx", "--out", str(foreign)]) == 2
    assert foreign.read_bytes() == b"not ours" and "\n" not in capsys.readouterr().err.strip()
