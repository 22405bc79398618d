"""Labeling at scale: linear bookkeeping with exact resume after SIGKILL, sharded runs (--num-parts, torchrun)
and batched network inference, each giving the same bytes as one uninterrupted process."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nakt
from nakt.io import labelset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def scale_data(tmp_path_factory) -> Path:
    """20 small generated images to label and a tiny teacher trained for one epoch on 4 others."""
    from nakt.demo import make_synthetic_dataset

    root = tmp_path_factory.mktemp("scale")
    data = make_synthetic_dataset(root / "data", size=40, seed=3, splits={"train": 4, "transferal": 20})
    nakt.train(model="monai:UNet", images=str(data / "images"), masks=str(data / "masks"), out=str(root / "run"),
               cases=f"{data / 'splits.json'}:train", size=[32], epochs=1, val_fraction=0, progress=False)
    return root


def label_args(root: Path, out: Path, *extra) -> list[str]:
    data = root / "data"
    return ["label", "--teacher", str(root / "run"), "--teacher", str(root / "run"), "--images",
            str(data / "images"), "--cases", f"{data / 'splits.json'}:transferal", "--out", str(out),
            "--fusion", "staple", "--save-teacher-probs", "--device", "cpu", "--no-progress", *extra]


def command(root: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "nakt", *label_args(root, out, *extra)]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tree(expected: Path, got: Path) -> None:
    a, b = tree(expected), tree(got)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, different


@pytest.fixture(scope="module")
def reference(scale_data, tmp_path_factory) -> Path:
    """The label set of one uninterrupted process."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    done = subprocess.run(command(scale_data, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def n_records(out: Path) -> int:
    folder = out / labelset.RECORDS
    return len([n for n in os.listdir(folder) if not n.startswith(".")]) if folder.is_dir() else 0


def kill_when(cmd: list[str], ready) -> bool:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; True when it was killed before finishing."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.002)
        killed = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        return killed
    finally:
        proc.wait()


def test_manifest_is_consolidated_with_its_old_format(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["format"] == labelset.LABELSET_FORMAT and len(manifest["cases"]) == 20
    first = next(iter(manifest["cases"].values()))
    assert first["mask"].startswith("masks/") and "staple" in first and "agreement" in first
    assert labelset.is_label_set(reference)


def test_sigkill_at_random_moments_then_rerun_gives_the_same_bytes(scale_data, reference, tmp_path):
    out = tmp_path / "labels"
    rng = random.Random(12)
    killed = 0
    for target in sorted(rng.sample(range(1, 19), 2)):  # two kills (each a process start, ~7 s of the suite)
        killed += kill_when(command(scale_data, out), lambda t=target: n_records(out) >= t)
        assert labelset.is_label_set(out)  # an unfinished label set is still one, and resumable
    assert killed == 2 and n_records(out) < 20
    done = subprocess.run(command(scale_data, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tree(reference, out)


def test_a_run_killed_before_its_first_case_resumes(scale_data, reference, tmp_path):
    out = tmp_path / "labels"
    kill_when(command(scale_data, out), lambda: (out / "manifest.json").is_file())
    assert n_records(out) < 20
    done = subprocess.run(command(scale_data, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tree(reference, out)


def run_all(commands: list[list[str]], together: bool) -> None:
    """Run `commands` one after the other, or all at once; each must succeed."""
    if not together:
        for cmd in commands:
            done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
        return
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]


@pytest.mark.parametrize("together", [False, True], ids=["one after the other", "concurrently"])
def test_two_parts_give_the_bytes_of_one_process(scale_data, reference, tmp_path, together):
    out = tmp_path / "labels"
    run_all([command(scale_data, out, "--num-parts", "2", "--part-id", str(i)) for i in (1, 0)], together)
    assert_same_tree(reference, out)


def test_torchrun_gives_the_bytes_of_one_process(scale_data, reference, tmp_path):
    out = tmp_path / "labels"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "nakt", *label_args(scale_data, out)]
    run_all([cmd], together=False)
    assert_same_tree(reference, out)


@pytest.mark.parametrize("extra, message", [
    (["--num-parts", "2", "--part-id", "2"], "--part-id: must be in [0, 2), got 2"),
    (["--num-parts", "0"], "--num-parts: must be at least 1, got 0"),
    (["--num-parts", "2", "--overwrite"], "--overwrite with --num-parts"),
])
def test_bad_parts_are_one_line(scale_data, tmp_path, capsys, extra, message):
    from nakt.cli import main

    assert main(label_args(scale_data, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def loaded_block(root: Path, teachers, n: int = 5):
    from nakt.batched import blocks, load_blocks
    from nakt.io.dataset import discover_cases

    cases = discover_cases(str(root / "data" / "images"), cases=f"{root / 'data' / 'splits.json'}:transferal")
    return next(load_blocks(cases, blocks(len(cases), n)[:1], "RAS", teachers))


def test_batched_fp32_equals_one_case_at_a_time(scale_data):
    import numpy as np

    from nakt.batched import block_probs
    from nakt.inference import infer_probs
    from nakt.teachers import load_teacher

    teacher = load_teacher(str(scale_data / "run"), "cpu")
    block = loaded_block(scale_data, [teacher])
    batched = block_probs(teacher, block, "fp32")
    for item, probs in zip(block, batched):
        np.testing.assert_allclose(probs, infer_probs(teacher.model, item.image.array), atol=1e-5)


def test_bf16_agrees_with_fp32_and_is_recorded(scale_data, tmp_path):
    import numpy as np

    from nakt.batched import block_probs
    from nakt.teachers import load_teacher

    teacher = load_teacher(str(scale_data / "run"), "cpu")
    block = loaded_block(scale_data, [teacher])
    for a, b in zip(block_probs(teacher, block, "fp32"), block_probs(teacher, block, "bf16")):
        # a one-epoch teacher sits near 0.5 almost everywhere, where bf16 rounding flips ties; trained teachers
        # agree on 99.987% of pixels (benchmarks/throughput.py)
        assert b.dtype == np.float32 and (a.argmax(0) == b.argmax(0)).mean() >= 0.97
    out = nakt.label(teacher=[str(scale_data / "run")], images=str(scale_data / "data" / "images"),
                     cases=f"{scale_data / 'data' / 'splits.json'}:transferal", out=str(tmp_path / "l"),
                     precision="bf16", batch_size=4, device="cpu", progress=False)
    assert json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    with pytest.raises(nakt.NaktError, match="--precision bf16"):
        nakt.label(teacher=[str(scale_data / "run")], images=str(scale_data / "data" / "images"),
                   cases=f"{scale_data / 'data' / 'splits.json'}:transferal", out=str(tmp_path / "l"),
                   precision="fp32", device="cpu", progress=False)


def test_flip_tta_changes_nothing_for_a_flip_symmetric_input(scale_data):
    import numpy as np
    import torch

    from nakt.inference import net_probs
    from nakt.models import NaktModel
    from nakt.teachers import load_teacher

    unet = load_teacher(str(scale_data / "run"), "cpu")
    x = torch.randn(3, 1, 32, 32)
    x = x + x.flip(-1)  # mirror-symmetric images
    plain, flipped = net_probs(unet.model, x, "fp32"), net_probs(unet.model, x, "fp32", "flip")
    np.testing.assert_allclose(flipped, (plain + plain.flip(-1)) / 2, atol=1e-6)
    np.testing.assert_allclose(flipped, flipped.flip(-1), atol=1e-6)  # the averaged output is symmetric too
    # a network that commutes with mirroring (pointwise) sees nothing new in the mirror: TTA changes nothing
    pointwise = NaktModel(torch.nn.Conv2d(1, 2, 1), unet.card).eval()
    np.testing.assert_allclose(net_probs(pointwise, x, "fp32", "flip"), net_probs(pointwise, x, "fp32"),
                               atol=1e-6)


def test_predict_and_evaluate_run_batched_with_the_same_results_as_case_by_case(scale_data, tmp_path):
    """predict and evaluate use the labeling pipeline: batches of cases (any size), one background writer or
    scorer; their masks and scores equal the per-case inference core's (`predict_array`)."""
    import numpy as np

    from nakt.io.images import read_image, read_mask
    from nakt.predict import predict_array

    data, run = scale_data / "data", str(scale_data / "run")
    common = {"images": str(data / "images"), "cases": f"{data / 'splits.json'}:transferal", "device": "cpu",
              "precision": "fp32", "progress": False}
    batched = nakt.predict(model=run, out=str(tmp_path / "b8"), batch_size=8, save_probs=True, **common)
    single = nakt.predict(model=run, out=str(tmp_path / "b1"), batch_size=1, **common)
    model = nakt.load(run)
    masks = sorted((batched).glob("*.png"))
    assert len(masks) == 20 and (batched / "probs" / f"{masks[0].stem}.npz").is_file()
    for mask in masks:
        expected = predict_array(model, read_image([data / "images" / mask.name]).array)
        assert (read_mask(mask) == expected).mean() >= 0.999, mask.name
        assert (read_mask(mask) == read_mask(single / mask.name)).mean() >= 0.999, mask.name
    assert json.loads((batched / "predictions.json").read_text())["complete"] is True

    scored = nakt.evaluate(model=run, masks=str(data / "masks"), out=str(tmp_path / "eval_model"), batch_size=3,
                           **common)
    from_disk = nakt.evaluate(pred=str(batched), masks=str(data / "masks"), out=str(tmp_path / "eval_pred"),
                              **common)
    assert [c["case"] for c in scored["per_case"]] == [c["case"] for c in from_disk["per_case"]]
    assert len(scored["per_case"]) == 20
    np.testing.assert_allclose([c["dice"] for c in scored["per_case"]],
                               [c["dice"] for c in from_disk["per_case"]], atol=0.01)
    # a label set is scored by its masks/ (one teacher: predict's masks up to near-ties rounded by storage)
    labels = nakt.label(teacher=[run], out=str(tmp_path / "labels"), batch_size=8, **common)
    from_labels = nakt.evaluate(pred=str(labels), masks=str(data / "masks"), out=str(tmp_path / "eval_labels"),
                                **common)
    assert [c["case"] for c in from_labels["per_case"]] == [c["case"] for c in from_disk["per_case"]]
    np.testing.assert_allclose([c["dice"] for c in from_labels["per_case"]],
                               [c["dice"] for c in from_disk["per_case"]], atol=0.01)


def test_the_background_writer_raises_a_jobs_error_in_the_caller():
    from nakt.batched import BackgroundWriter

    done = []
    with pytest.raises(ZeroDivisionError), BackgroundWriter(depth=1) as writer:
        writer.submit(done.append, 1)
        writer.submit(lambda: 1 / 0)
        writer.submit(done.append, 2)  # waits for the failing job first, and raises its error here
    assert done == [1]


def test_loader_workers_give_the_same_bytes_in_2d(scale_data, reference, tmp_path):
    out = tmp_path / "labels"
    run_all([command(scale_data, out, "--num-workers", "2")], together=False)
    assert_same_tree(reference, out)


def test_loader_workers_give_the_same_bytes_in_3d_with_sliding_windows(tmp_path):
    """3D volumes (two modalities, a patch model: batched sliding windows) decoded in loader processes."""
    import shutil

    import numpy as np
    from conftest import write_volume_case

    rng = np.random.default_rng(0)
    for i in range(3):
        case = write_volume_case(tmp_path / "images", f"c{i}", rng, shape=(28, 24, 20))
        (tmp_path / "masks").mkdir(exist_ok=True)
        shutil.move(case / "seg.nii.gz", tmp_path / "masks" / f"c{i}.nii.gz")
    run = nakt.train(model="monai:UNet", images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                     out=str(tmp_path / "run"), patch=[24], patches_per_case=1, epochs=1, val_fraction=0,
                     batch_size=2, progress=False, device="cpu",
                     model_kwargs={"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1})
    trees = []
    for workers in (0, 2):
        out = nakt.label(teacher=[str(run)], images=str(tmp_path / "images"), out=str(tmp_path / f"w{workers}"),
                         num_workers=workers, device="cpu", progress=False)
        trees.append(tree(out))
    manifest = json.loads(trees[0]["manifest.json"])
    assert manifest["batch_size"] == 1 and len(manifest["cases"]) == 3  # 3D teachers: one volume per batch
    assert sorted(trees[0]) == sorted(trees[1]) and trees[0] == trees[1]


def test_label_arrays_is_the_in_memory_twin_of_label(scale_data, tmp_path):
    """`label_arrays` (models + one array, nothing on disk) gives the fused probabilities `nakt label` stores
    for the same case (up to the label set's 1/256 storage step)."""
    import numpy as np

    from nakt.io import labelset
    from nakt.io.dataset import discover_cases
    from nakt.io.images import read_image
    from nakt.label import label_arrays

    data, run = scale_data / "data", str(scale_data / "run")
    out = nakt.label(teacher=[run, run], images=str(data / "images"), cases=f"{data / 'splits.json'}:transferal",
                     out=str(tmp_path / "l"), fusion="mean", precision="fp32", device="cpu", progress=False)
    models = [nakt.load(run), nakt.load(run)]
    for case in discover_cases(str(data / "images"), cases=f"{data / 'splits.json'}:transferal")[:3]:
        fused, teacher_probs, _ = label_arrays(models, read_image(case.images).array, "mean")
        assert teacher_probs.shape[0] == 2
        np.testing.assert_allclose(fused, labelset.read_probs(out, case.name), atol=1 / 256 + 1e-6)
