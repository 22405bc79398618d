"""``nnunet:`` teachers against nnU-Net's own tools: a tiny dataset planned by nnU-Net's planner, a checkpoint
written by nnU-Net's trainer, reference probabilities from ``nnUNetv2_predict --save_probabilities``."""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nakt.errors import NaktError
from nakt.io.dataset import Case
from nakt.io.images import read_image, read_mask
from nakt.models.nnunet import nnunet_probs_to_grid, parse_nnunet_spec, trusted_spec
from nakt.teachers import load_teacher

# Runs in a subprocess: nnunetv2 reads nnUNet_raw/_preprocessed/_results when first imported, and its planner and
# preprocessor start "spawn" worker processes, which re-import the main module (hence the __main__ guard).
BUILD_2D = r'''
import json, os, sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(root):
    ds = root / "raw" / "Dataset901_Tiny"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # 32x32 grey discs: a "ring" (1) around a "core" (2)
        yy, xx = np.mgrid[:32, :40]
        r = np.hypot(yy - rng.uniform(10, 22), xx - rng.uniform(10, 30))
        label = np.where(r < 4, 2, np.where(r < 8, 1, 0)).astype(np.uint8)
        image = np.clip(label * 70 + rng.normal(40, 15, label.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(ds / "imagesTr" / f"case{i:02d}_0000.png")
        Image.fromarray(label).save(ds / "labelsTr" / f"case{i:02d}.png")
    json.dump({"channel_names": {"0": "grey"}, "labels": {"background": 0, "ring": 1, "core": 2},
               "numTraining": 8, "file_ending": ".png"}, open(ds / "dataset.json", "w"))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    extract_fingerprints([901], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([901])
    preprocess([901], configurations=("2d",), num_processes=(1,), verbose=False)

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (the planner needs >= 1)
    trainer = get_trainer_from_args("901", "2d", 0, device=torch.device("cpu"))
    # nnU-Net's own training loop and save_checkpoint, shortened to one epoch of two iterations
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    trainer.run_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


def nnunet_env(root: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f",
            "nnUNet_def_n_proc": "1"}


def run_nnunet(commands: list[list[str]], root: Path, logs: Path | None = None) -> None:
    """Start nnU-Net commands on the folders under `root` side by side, each logging to (`logs` or
    root)/log<i>.txt, and wait for them all."""
    logs = logs or root
    running = []
    for i, args in enumerate(commands):
        log = open(logs / f"log{i}.txt", "w")
        running.append((subprocess.Popen(args, env=nnunet_env(root), stdout=log, stderr=subprocess.STDOUT), log))
    for i, (proc, log) in enumerate(running):
        proc.wait(timeout=600)
        log.close()
        assert proc.returncode == 0, (logs / f"log{i}.txt").read_text()[-3000:]


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory) -> Path:
    """nnU-Net's raw/preprocessed/results folders holding a 2D (Dataset901) and a 3d_fullres (Dataset902) model,
    each planned and trained by nnU-Net's code; the two builds run side by side (mostly process start-up)."""
    pytest.importorskip("nnunetv2")
    root = tmp_path_factory.mktemp("nnunet")
    for name, script in (("build2d.py", BUILD_2D), ("build3d.py", BUILD_3D)):
        (root / name).write_text(script)
    start = time.perf_counter()
    run_nnunet([[sys.executable, str(root / name), str(root)] for name in ("build2d.py", "build3d.py")], root)
    print(f"\nnnU-Net fixture: plan + preprocess + train, 2D and 3D side by side {time.perf_counter() - start:.1f} s")
    return root


@pytest.fixture(scope="module")
def model2d(nnunet_root) -> dict:
    """The 2D nnU-Net model folder trained for two iterations by nnU-Net, and nnUNetv2_predict's outputs (with
    and without mirroring) for two cases."""
    root = nnunet_root
    start = time.perf_counter()
    folder = root / "res" / "Dataset901_Tiny" / "nnUNetTrainer__nnUNetPlans__2d"
    images = root / "predict_in"
    images.mkdir()
    for name in ("case00", "case01"):
        shutil.copy(root / "raw" / "Dataset901_Tiny" / "imagesTr" / f"{name}_0000.png", images)
    outputs = {tta: root / f"predict_tta{int(tta)}" for tta in (True, False)}
    # side by side (mostly start-up), each in one process (-npp 0 -nps 0: no workers), logs in their own folders
    run_nnunet([[str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(images), "-o", str(out),
                 "-d", "901", "-c", "2d", "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu",
                 "-npp", "0", "-nps", "0", "--save_probabilities", "--disable_progress_bar"]
                + ([] if tta else ["--disable_tta"]) for tta, out in outputs.items()], root)
    print(f"\nnnU-Net 2D fixture: two nnUNetv2_predict runs side by side {time.perf_counter() - start:.1f} s")
    return {"root": root, "folder": folder, "images": images, "predicted": outputs}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("tta", [True, False])
def test_probs_equal_nnunet_predict(model2d, tta):
    teacher = load_teacher(f"nnunet:{model2d['folder']}?tta={int(tta)}")
    assert teacher.predictor.use_mirroring is tta
    for name in ("case00", "case01"):
        files = [model2d["images"] / f"{name}_0000.png"]
        image = read_image(files)
        probs = teacher.case_probs(Case(name, files), image)
        saved = np.load(model2d["predicted"][tta] / f"{name}.npz")["probabilities"]
        assert saved.shape == (3, 1, 32, 40) and probs.shape == (3, 32, 40) and probs.dtype == np.float32
        reference = nnunet_probs_to_grid(saved, image, "NaturalImage2DIO")
        assert np.abs(probs - reference).max() <= 1e-3
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
        # independent of the mapping: nnU-Net's own segmentation file, read by nakt
        seg = read_mask(model2d["predicted"][tta] / f"{name}.png", like=image)
        assert (probs.argmax(0) == seg).mean() > 0.999


def test_card_from_dataset_json_and_plans(model2d):
    card = load_teacher(f"nnunet:{model2d['folder']}").card
    assert (card.in_channels, card.classes, card.spatial_dims, card.task) == (1, 3, 2, "segmentation")
    assert card.label_values == [0, 1, 2] and card.class_names == ["background", "ring", "core"]


def fake_model(model2d, tmp_path: Path) -> Path:
    """A copy of the model folder's JSON files, without checkpoints."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model2d["folder"] / name, folder)
    return folder


class WritesMarker:
    """Unpickling this calls exec, which writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle2", "pickle4"])
def test_malicious_checkpoint_runs_no_code(model2d, tmp_path, writer):
    folder = fake_model(model2d, tmp_path)
    marker = tmp_path / "marker"
    real = torch.load(model2d["folder"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    evil = {**real, "logging": WritesMarker(marker)}  # a real checkpoint with one booby-trapped entry
    (folder / "fold_0").mkdir()
    with open(folder / "fold_0" / "checkpoint_final.pth", "wb") as f:
        torch.save(evil, f) if writer == "torch.save" else pickle.dump(evil, f, protocol=int(writer[-1]))
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{folder}")
    text = one_line(exc)
    assert ": refused: it pickles " in text and "trust=1" in text
    if writer == "torch.save":  # raw pickles are refused earlier: at tensors pickled the plain way, or protocol 4
        assert "pickles exec" in text
    assert not marker.exists()
    # trust means trust: the same file then runs its code (what --trust-checkpoint lets through); a plain pickle
    # is then refused by torch.load as a checkpoint, after unpickling
    with contextlib.suppress(NaktError):
        load_teacher(f"nnunet:{folder}?trust=1")
    assert marker.exists()


def test_checkpoint_outside_allow_list_refused(model2d, tmp_path):
    folder = fake_model(model2d, tmp_path)
    (folder / "fold_0").mkdir()
    torch.save({"network_weights": {}, "extra": np.arange(3)}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(NaktError, match="refused: it pickles numpy"):
        load_teacher(f"nnunet:{folder}")


def test_plans_naming_foreign_network_refused(model2d, tmp_path):
    folder = fake_model(model2d, tmp_path)
    shutil.copytree(model2d["folder"] / "fold_0", folder / "fold_0")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{folder}")
    assert "plans.json: refused: network class 'os.system'" in one_line(exc)


def test_region_labels_refused(model2d, tmp_path):
    folder = fake_model(model2d, tmp_path)
    shutil.copytree(model2d["folder"] / "fold_0", folder / "fold_0")
    data = json.loads((folder / "dataset.json").read_text())
    data["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    data["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(NaktError, match="region-based"):
        load_teacher(f"nnunet:{folder}")


def test_missing_files_are_one_line(model2d, tmp_path):
    folder = model2d["folder"]
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{folder}?folds=0,3")
    assert one_line(exc).startswith(f"{folder / 'fold_3' / 'checkpoint_final.pth'}: not found")
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{folder}?checkpoint=checkpoint_latest.pth")
    assert "fold_0/checkpoint_latest.pth: not found" in one_line(exc)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("plans.json"))
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{bare}")
    assert one_line(exc).startswith(f"{bare / 'plans.json'}: not found")
    with pytest.raises(NaktError) as exc:
        load_teacher(f"nnunet:{tmp_path / 'nowhere'}")
    assert "nnU-Net model folder not found" in one_line(exc)


def test_wrong_channel_count_is_one_line(model2d, tmp_path):
    from PIL import Image as PILImage

    rgb = tmp_path / "rgb.png"
    PILImage.fromarray(np.zeros((32, 40, 3), np.uint8)).save(rgb)
    teacher = load_teacher(f"nnunet:{model2d['folder']}")
    with pytest.raises(NaktError, match="3 channel"):
        teacher.case_probs(Case("rgb", [rgb]), read_image(rgb))


def test_spec_options():
    folder, options = parse_nnunet_spec("runs/m?folds=all&checkpoint=checkpoint_best.pth&trust=1")
    assert folder == Path("runs/m") and options["folds"] == ["all"] and options["trust"] and options["tta"]
    for bad in ("m?fold=0", "m?folds=a", "m?tta=maybe", "m?checkpoint=../x.pth"):
        with pytest.raises(NaktError):
            parse_nnunet_spec(bad)
    assert trusted_spec("nnunet:m") == "nnunet:m?trust=1"
    assert parse_nnunet_spec(trusted_spec("nnunet:m?folds=0,1&trust=0")[len("nnunet:"):])[1]["trust"]


def test_without_nnunetv2_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # makes `import nnunetv2` raise ImportError
    with pytest.raises(NaktError) as exc:
        load_teacher("nnunet:some/folder")
    assert one_line(exc) == 'nnunet:some/folder: needs the nnunet extra: pip install "nakt[nnunet]"'


# --- the grid mapping, checked against nnU-Net's own readers (no model needed) ---

PERMUTING_AFFINE = np.array([[0.0, -1.2, 0.0, 10.0],  # storage j runs towards L, i towards S, k towards P
                             [0.0, 0.0, -2.0, 5.0],
                             [1.5, 0.0, 0.0, -3.0],
                             [0.0, 0.0, 0.0, 1.0]])


def reader(name: str):
    pytest.importorskip("nnunetv2")
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    return recursive_find_reader_writer_by_name(name)()


@pytest.mark.parametrize("io_class", ["SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"])
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "none"])
def test_grid_mapping_3d_nifti(tmp_path, io_class, orientation):
    """nnU-Net's probabilities are on its reader's array grid: mapping that array must give nakt's array."""
    import nibabel as nib

    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, PERMUTING_AFFINE), str(path))
    image = read_image(path, orientation)
    nnunet_array, _ = reader(io_class).read_images([str(path)])  # [1, z, y, x] in the reader's frame
    np.testing.assert_array_equal(nnunet_probs_to_grid(nnunet_array, image, io_class), image.array)


def test_grid_mapping_3d_mha(tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7))
    img.SetDirection([0, 1, 0, 0, 0, -1, -1, 0, 0])
    img.SetSpacing((1.0, 2.0, 3.0))
    path = tmp_path / "vol.mha"
    sitk.WriteImage(img, str(path))
    image = read_image(path)
    nnunet_array, _ = reader("SimpleITKIO").read_images([str(path)])
    np.testing.assert_array_equal(nnunet_probs_to_grid(nnunet_array, image, "SimpleITKIO"), image.array)


@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".mha"])
def test_grid_mapping_2d(tmp_path, suffix):
    rows, cols = np.mgrid[:9, :13]
    data = (rows * 13 + cols).astype(np.uint8)
    path = tmp_path / f"img{suffix}"
    if suffix == ".png":
        from PIL import Image as PILImage

        PILImage.fromarray(data).save(path)
        io_class = "NaturalImage2DIO"
    else:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
        io_class = "SimpleITKIO"
    image = read_image(path)
    nnunet_array, _ = reader(io_class).read_images([str(path)])  # [1, 1, H, W]
    np.testing.assert_array_equal(nnunet_probs_to_grid(nnunet_array, image, io_class), image.array)


def test_grid_mapping_rgb_png(tmp_path):
    from PIL import Image as PILImage

    data = np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    PILImage.fromarray(data).save(path)
    image = read_image(path)
    nnunet_array, _ = reader("NaturalImage2DIO").read_images([str(path)])  # [3, 1, H, W]
    np.testing.assert_array_equal(nnunet_probs_to_grid(nnunet_array, image, "NaturalImage2DIO"), image.array)


def test_grid_mapping_wrong_shape_is_one_line(tmp_path):
    from PIL import Image as PILImage

    path = tmp_path / "a.png"
    PILImage.fromarray(np.zeros((9, 13), np.uint8)).save(path)
    with pytest.raises(NaktError) as exc:
        nnunet_probs_to_grid(np.zeros((2, 1, 13, 9), np.float32), read_image(path), "NaturalImage2DIO")
    assert "cover (13, 9), the image is (9, 13)" in one_line(exc)


def test_three_frameworks_fuse_into_one_label_set_with_staple(model2d, tmp_path):
    """nnU-Net (its own predictor), ONNX (onnxruntime, exported from a nakt run) and a PyTorch nakt run of another
    architecture label the same images; STAPLE fuses them and estimates each one's quality."""
    import nakt

    pytest.importorskip("onnxruntime")
    raw = model2d["root"] / "raw" / "Dataset901_Tiny"
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for label in sorted((raw / "labelsTr").glob("*.png")):
        shutil.copy(raw / "imagesTr" / f"{label.stem}_0000.png", images / label.name)
        shutil.copy(label, masks / label.name)
    common = dict(images=str(images), masks=str(masks), size=[32], epochs=1, val_fraction=0, progress=False)
    onnx_source = nakt.train(model="monai:UNet", out=str(tmp_path / "unet"), **common)
    exported = nakt.export(model=str(onnx_source), format="onnx", out=str(tmp_path / "unet.onnx"))
    other = nakt.train(model="monai:SegResNet", out=str(tmp_path / "segresnet"), **common)
    specs = [f"nnunet:{model2d['folder']}?folds=0", f"onnx:{exported}", str(other)]
    fused = nakt.label(teacher=specs, images=str(images), out=str(tmp_path / "labels"), fusion="staple",
                       progress=False)
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["label_values"] == [0, 1, 2] and [t["spec"] for t in manifest["teachers"]] == specs
    assert len(manifest["cases"]) == 8
    for record in manifest["cases"].values():
        assert len(record["staple"]["sensitivity"]) == 3 and len(record["staple"]["specificity"]) == 3
    assert set(np.unique(read_mask(fused / "masks" / "case00.png"))) <= {0, 1, 2}


BUILD_3D = r'''
import os, sys
from pathlib import Path

import nibabel as nib
import numpy as np


def main(root):
    ds = root / "raw" / "Dataset902_Tiny3d"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])  # anisotropic: nnU-Net plans a resampling
    for i in range(6):  # 20x16x12 blobs
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in (20, 16, 12)], indexing="ij")
        r = np.sqrt((zz - rng.uniform(7, 13)) ** 2 + (yy - rng.uniform(5, 11)) ** 2 + (xx - rng.uniform(4, 8)) ** 2)
        label = (r < 4).astype(np.uint8)
        image = (label * 3 + rng.normal(0, 0.5, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), str(ds / "imagesTr" / f"vol{i:02d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(ds / "labelsTr" / f"vol{i:02d}.nii.gz"))
    import json
    json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 6,
               "file_ending": ".nii.gz"}, open(ds / "dataset.json", "w"))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    extract_fingerprints([902], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([902])
    preprocess([902], configurations=("3d_fullres",), num_processes=(1,), verbose=False)

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    os.environ["nnUNet_n_proc_DA"] = "0"
    trainer = get_trainer_from_args("902", "3d_fullres", 0, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    trainer.run_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


def test_3d_nnunet_teacher_equals_nnunet_predict_on_any_storage_order(nnunet_root, tmp_path):
    """A 3d_fullres model planned and trained by nnU-Net's code: nakt's probabilities for a NIfTI volume, and for a
    copy with permuted, flipped storage axes, equal nnUNetv2_predict's on the same files, mapped onto nakt's grid
    and labels written back in each file's own geometry. (nnU-Net itself sees each file in its storage order, so
    the two copies' labels may differ: nakt reproduces nnU-Net, it does not change what nnU-Net computes.)"""
    import nibabel as nib

    import nakt

    folder = nnunet_root / "res" / "Dataset902_Tiny3d" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    source = nnunet_root / "raw" / "Dataset902_Tiny3d" / "imagesTr" / "vol00_0000.nii.gz"
    img = nib.load(str(source))
    data = np.asarray(img.dataobj)
    permuted = np.ascontiguousarray(np.flip(data.transpose(2, 0, 1), axis=1))
    new_to_old = np.array([[0, -1, 0, data.shape[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(source, cases / "a_0000.nii.gz")
    nib.save(nib.Nifti1Image(permuted, img.affine @ new_to_old), str(cases / "b_0000.nii.gz"))
    run_nnunet([[str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(cases), "-o",
                 str(tmp_path / "pred"), "-d", "902", "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "0",
                 "-nps", "0", "--save_probabilities", "--disable_progress_bar"]], nnunet_root, tmp_path)
    teacher = load_teacher(f"nnunet:{folder}")
    assert teacher.card.spatial_dims == 3 and teacher.card.label_values == [0, 1]
    labels = nakt.label(teacher=[f"nnunet:{folder}"], images=str(cases), out=str(tmp_path / "labels"),
                        progress=False)
    for name in ("a", "b"):
        files = [cases / f"{name}_0000.nii.gz"]
        image = read_image(files)
        probs = teacher.case_probs(Case(name, files), image)
        saved = np.load(tmp_path / "pred" / f"{name}.npz")["probabilities"]
        assert np.abs(probs - nnunet_probs_to_grid(saved, image)).max() <= 1e-3
        ours = nib.load(str(labels / "masks" / f"{name}_0000.nii.gz"))
        theirs = nib.load(str(tmp_path / "pred" / f"{name}.nii.gz"))
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-5)  # written in the file's own geometry
        assert (np.asarray(ours.dataobj) == np.asarray(theirs.dataobj)).mean() > 0.999


def test_three_frameworks_with_different_label_values_fuse_and_teach_without_a_map(nnunet_root, tmp_path):
    """nnU-Net trained on 0/1 labels (named background/blob), a nakt run and an ONNX export trained on the same
    volumes with 0/255 masks: they fuse with no mapping given (one foreground each), the manifest records the
    mapping, each case's fused probabilities are the mean of the three teachers' own (nnU-Net's class 1 counted
    as 255, not as background), and a student trains on the label set."""
    import nibabel as nib

    import nakt

    pytest.importorskip("onnxruntime")
    raw = nnunet_root / "raw" / "Dataset902_Tiny3d"
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for label in sorted((raw / "labelsTr").glob("*.nii.gz")):
        name = label.name.replace(".nii.gz", "")
        shutil.copy(raw / "imagesTr" / f"{name}_0000.nii.gz", images / label.name)
        img = nib.load(str(label))
        binary = (np.asarray(img.dataobj) * 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(binary, img.affine), str(masks / label.name))
    common = dict(images=str(images), masks=str(masks), patch=[32], epochs=2, batch_size=2, val_fraction=0,
                  progress=False, precision="fp32")
    small_unet = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}  # the mapping is tested, not Dice
    run = nakt.train(model="monai:UNet", model_kwargs=small_unet, out=str(tmp_path / "unet"), **common)
    segresnet = nakt.train(model="monai:SegResNet", model_kwargs={"init_filters": 8}, out=str(tmp_path / "seg"),
                           **common)
    exported = nakt.export(model=str(segresnet), format="onnx", out=str(tmp_path / "seg.onnx"))
    folder = nnunet_root / "res" / "Dataset902_Tiny3d" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    specs = [f"nnunet:{folder}", str(run), f"onnx:{exported}"]
    fused = nakt.label(teacher=specs, images=str(images), out=str(tmp_path / "labels"), fusion="mean",
                       precision="fp32", progress=False)
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["label_values"] == [0, 255] and manifest["class_names"] == ["background", "blob"]
    own_to_target = [t["classes"] for t in manifest["label_mapping"]["by_teacher"]]
    assert own_to_target == [{"0": 0, "1": 255}, {"0": 0, "255": 255}, {"0": 0, "255": 255}]
    teachers = [load_teacher(spec) for spec in specs]
    for name in ("vol00", "vol03"):
        files = [images / f"{name}.nii.gz"]
        image = read_image(files, orientation="RAS")
        expected = np.mean([t.case_probs(Case(name, files), image) for t in teachers], axis=0)
        written = np.load(fused / "probs" / f"{name}.npz")["probs"].astype(np.float32)
        assert written.shape == expected.shape and np.abs(written - expected).mean() < 0.01
    student = nakt.train(model="monai:UNet", model_kwargs=small_unet, images=str(images), masks=str(fused),
                         out=str(tmp_path / "student"), patch=[32], epochs=1, batch_size=2, val_fraction=0,
                         progress=False, precision="fp32")
    card = json.loads((student / "config.json").read_text())
    assert card["label_values"] == [0, 255] and card["class_names"] == ["background", "blob"]
