"""`export_nnunet`: label sets (made by `nakt.label` with tiny in-process teachers) exported as nnU-Net v2 raw
datasets that nnU-Net's own integrity check accepts; consecutive labels; nakt never writes into foreign folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import splits_of, write_volume_case

import nakt
from nakt.errors import NaktError
from nakt.export_nnunet import ExportNnunetOptions, export_nnunet

NNUNET_BIN = Path(sys.executable).parent / "nnUNetv2_extract_fingerprint"


def case_list(path: Path, names: list[str]) -> str:
    path.write_text("\n".join(names))
    return str(path)


def nnunet_verify(raw: Path, dataset_ids: list[int], tmp: Path) -> subprocess.CompletedProcess:
    """Run nnU-Net's own fingerprint extraction with ``--verify_dataset_integrity`` on ``raw/DatasetNNN_*``."""
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp / "pre"),
           "nnUNet_results": str(tmp / "res")}
    return subprocess.run([str(NNUNET_BIN), "-d", *map(str, dataset_ids), "--verify_dataset_integrity", "-np", "1",
                           "--no_pbar"], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def label_set_2d(synthetic2d, unet_teacher, tmp_path_factory) -> Path:
    """A label set of 4 cases of the synthetic transferal split (masks 0/255) from the shared UNet teacher."""
    work = tmp_path_factory.mktemp("export2d")
    splits = splits_of(synthetic2d)
    return nakt.label(teacher=[str(unet_teacher)], images=str(synthetic2d / "images"),
                      cases=case_list(work / "transferal.txt", splits["transferal"][:4]), out=str(work / "labels"),
                      progress=False)


@pytest.fixture(scope="module")
def exports(label_set_2d, synthetic2d, tmp_path_factory) -> dict:
    """The 2D label set and a 3D one (`volumes_3d`) exported side by side into one nnU-Net raw folder, and
    nnU-Net's integrity check run once over both (its start-up is most of its time)."""
    if not NNUNET_BIN.exists():
        pytest.skip("nnunetv2 not installed")
    root = tmp_path_factory.mktemp("nnunet_exports")
    raw = root / "raw"
    out2d = export_nnunet(ExportNnunetOptions(labels=str(label_set_2d), images=str(synthetic2d / "images"),
                                              out=str(raw / "Dataset501_Synth")))
    images, labels = volumes_3d(root)
    out3d = export_nnunet(ExportNnunetOptions(labels=str(labels), images=str(images), channels=["flair*", "t1c*"],
                                              out=str(raw / "Dataset507_Vols")))
    return {"2d": out2d, "3d": out3d, "images_3d": images, "labels_3d": labels, "pre": root / "pre",
            "check": nnunet_verify(raw, [501, 507], root)}


def volumes_3d(root: Path) -> tuple[Path, Path]:
    """Two-modality NIfTI cases (one with a flipped, permuted affine, one stored as MHA) and their label set from a
    small 3D teacher: (images folder, label set)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    images = root / "vols"
    for i in range(2):
        write_volume_case(images, f"train{i}", rng)
    write_volume_case(images, "flipped", rng,
                      affine=np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 1.2, 0, -3], [0, 0, 0, 1]]))
    write_volume_case(images, "itk", rng)
    for name in ("flair", "t1c", "seg"):  # the same case as MHA (SimpleITK writes the NIfTI geometry over)
        path = images / "itk" / f"{name}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(path)), str(images / "itk" / f"{name}.mha"))
        path.unlink()
    vol = {"channels": ["flair*", "t1c*"], "progress": False}
    teacher = nakt.train(model="monai:UNet", images=str(images), masks=str(images), mask_file="seg*",
                         cases=case_list(root / "tr.txt", ["train0", "train1"]), out=str(root / "t3d"),
                         patch=[32], patches_per_case=2, epochs=4, batch_size=2, val_fraction=0, lr=1e-2,
                         augment=False, precision="fp32", **vol)  # sure to label both classes somewhere
    labels = nakt.label(teacher=[str(teacher)], images=str(images), out=str(root / "lab3d"),
                        cases=case_list(root / "tf.txt", ["flipped", "itk", "train0"]), **vol)
    return images, labels


def test_2d_export_passes_nnunet_integrity_check(exports, label_set_2d, synthetic2d):
    out = exports["2d"]
    dataset = json.loads((out / "dataset.json").read_text())
    manifest = json.loads((label_set_2d / "manifest.json").read_text())
    assert manifest["label_values"] == [0, 255]
    assert dataset == {**dataset, "channel_names": {"0": "image"}, "labels": {"background": 0, "label_255": 1},
                       "numTraining": 4, "file_ending": ".png", "nakt_label_values": [0, 255]}
    cases = sorted(manifest["cases"])
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in cases]
    from PIL import Image as PILImage

    for case in cases:  # images copied byte for byte; labels 0/255 -> 0/1 pixel for pixel
        source_image = synthetic2d / "images" / f"{case}.png"
        assert (out / "imagesTr" / f"{case}_0000.png").read_bytes() == source_image.read_bytes()
        exported = np.asarray(PILImage.open(out / "labelsTr" / f"{case}.png"))
        source = np.asarray(PILImage.open(label_set_2d / "masks" / f"{case}.png"))
        assert exported.dtype == np.uint8 and set(np.unique(exported)) <= {0, 1}
        np.testing.assert_array_equal(exported, source // 255)
    result = exports["check"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "verify_dataset_integrity Done" in result.stdout
    assert (exports["pre"] / "Dataset501_Synth" / "dataset_fingerprint.json").is_file()


def test_rgb_images_are_one_png_with_three_channels(label_set_2d, synthetic2d, tmp_path):
    """An RGBA PNG (as nakt reads it: RGB, alpha dropped) is converted to one RGB `_0000.png`, channels R, G, B."""
    from PIL import Image as PILImage

    images = tmp_path / "rgb"
    images.mkdir()
    cases = sorted(json.loads((label_set_2d / "manifest.json").read_text())["cases"])
    for case in cases:
        grey = np.asarray(PILImage.open(synthetic2d / "images" / f"{case}.png"))
        rgba = np.stack([grey, 255 - grey, grey // 2, np.full_like(grey, 200)], -1)
        PILImage.fromarray(rgba, "RGBA").save(images / f"{case}.png")
    out = export_nnunet(ExportNnunetOptions(labels=str(label_set_2d), images=str(images),
                                            out=str(tmp_path / "Dataset502_Rgb")))
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    written = PILImage.open(out / "imagesTr" / f"{cases[0]}_0000.png")
    assert written.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(written), np.asarray(PILImage.open(images / f"{cases[0]}.png"))[..., :3])
    # nnU-Net's reader sees 3 channels: (c, 1, rows, columns)
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    arr, _ = NaturalImage2DIO().read_images([str(out / "imagesTr" / f"{cases[0]}_0000.png")])
    assert arr.shape == (3, 1, 48, 48)
    with pytest.raises(NaktError, match="channel-names: 1 names for 3"):
        export_nnunet(ExportNnunetOptions(labels=str(label_set_2d), images=str(images), channel_names=["grey"],
                                          out=str(tmp_path / "Dataset503_Bad")))


def test_refuses_foreign_folders_and_bad_names(label_set_2d, synthetic2d, tmp_path):
    common = {"labels": str(label_set_2d), "images": str(synthetic2d / "images")}
    with pytest.raises(NaktError, match="DatasetNNN_Name"):
        ExportNnunetOptions(**common, out=str(tmp_path / "my_export"))
    foreign = tmp_path / "Dataset504_Theirs"  # a user's own nnU-Net dataset: it has a dataset.json, not our marker
    foreign.mkdir()
    (foreign / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(NaktError, match="not a nakt nnU-Net export"):
        export_nnunet(ExportNnunetOptions(**common, out=str(foreign)))
    assert sorted(p.name for p in foreign.iterdir()) == ["dataset.json"]
    ours = export_nnunet(ExportNnunetOptions(**common, out=str(tmp_path / "Dataset505_Ours")))
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(NaktError, match="--overwrite"):
        export_nnunet(ExportNnunetOptions(**common, out=str(ours)))
    export_nnunet(ExportNnunetOptions(**common, out=str(ours), overwrite=True))
    assert (ours / "notes.txt").read_text() == "mine" and (ours / "dataset.json").is_file()
    with pytest.raises(NaktError, match="none of its cases"):
        test_cases = case_list(tmp_path / "t.txt", splits_of(synthetic2d)["test"][:2])
        export_nnunet(ExportNnunetOptions(**common, cases=test_cases, out=str(tmp_path / "Dataset506_None")))
    assert not (tmp_path / "Dataset506_None").exists()


def test_3d_export_keeps_source_geometry(exports):
    """Images keep their own storage order and geometry (NIfTI copied, MHA converted), labels 0/1/2 on the same
    grid, and nnU-Net's check passes."""
    import nibabel as nib
    import SimpleITK as sitk

    out, images, labels = exports["3d"], exports["images_3d"], exports["labels_3d"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "flair", "1": "t1c"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "label_1": 1, "label_2": 2} and dataset["numTraining"] == 3
    source = images / "flipped"
    assert (out / "imagesTr" / "flipped_0000.nii.gz").read_bytes() == (source / "flair.nii.gz").read_bytes()
    assert (out / "imagesTr" / "flipped_0001.nii.gz").read_bytes() == (source / "t1c.nii.gz").read_bytes()
    exported = nib.load(str(out / "labelsTr" / "flipped.nii.gz"))
    np.testing.assert_allclose(exported.affine, nib.load(str(source / "flair.nii.gz")).affine)
    np.testing.assert_array_equal(np.asarray(exported.dataobj),
                                  np.asarray(nib.load(str(labels / "masks" / "flipped.nii.gz")).dataobj))
    itk_image = sitk.ReadImage(str(out / "imagesTr" / "itk_0000.nii.gz"))
    itk_label = sitk.ReadImage(str(out / "labelsTr" / "itk.nii.gz"))
    for exported_image in (itk_image, itk_label):  # MHA converted with its geometry
        original = sitk.ReadImage(str(images / "itk" / "flair.mha"))
        assert exported_image.GetSize() == original.GetSize()
        np.testing.assert_allclose(exported_image.GetOrigin(), original.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(exported_image.GetDirection(), original.GetDirection(), atol=1e-6)
    result = exports["check"]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "mismatch" not in result.stdout
    assert (exports["pre"] / "Dataset507_Vols" / "dataset_fingerprint.json").is_file()


def test_class_order_and_names():
    from nakt.export_nnunet import _class_order, _label_names

    assert _class_order([255, 0]) == [0, 255]
    manifest = {"label_values": [0, 1, 2], "class_names": ["bg", "liver", "liver"]}
    assert _label_names(manifest, [0, 1, 2]) == {"background": 0, "liver": 1, "liver_2": 2}


def test_mask_with_foreign_value_is_one_line(label_set_2d, synthetic2d, tmp_path):
    from PIL import Image as PILImage

    copy = tmp_path / "labels"
    shutil.copytree(label_set_2d, copy)
    case = sorted(json.loads((copy / "manifest.json").read_text())["cases"])[0]
    PILImage.fromarray(np.full((48, 48), 7, np.uint8)).save(copy / "masks" / f"{case}.png")
    with pytest.raises(NaktError, match=r"label value 7, not among the label set's \[0, 255\]"):
        export_nnunet(ExportNnunetOptions(labels=str(copy), images=str(synthetic2d / "images"),
                                          out=str(tmp_path / "Dataset508_Bad")))
