import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from nakt.errors import NaktError
from nakt.io.dataset import discover_cases, read_case_list
from nakt.io.images import case_name, read_image, read_mask, write_label


def test_nifti_label_keeps_affine_and_header(tmp_path):
    affine = np.array([[0, -0.9, 0, 10.0], [1.1, 0, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(10, 12, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    stored = read_image(tmp_path / "ct.nii.gz", orientation="none")
    assert stored.array.shape == (1, 10, 12, 7) and stored.spacing == pytest.approx((1.1, 0.9, 2.5))
    image = read_image(tmp_path / "ct.nii.gz")  # RAS: axis 0 is storage j flipped (j runs left), axis 1 is i
    assert image.array.shape == (1, 12, 10, 7)
    assert image.spacing == pytest.approx((0.9, 1.1, 2.5))
    np.testing.assert_array_equal(image.array[0], data.transpose(1, 0, 2)[::-1])
    label = (data > 0).astype(np.int64) * 3  # in storage order, as the file must hold it
    out = write_label((image.array[0] > 0).astype(np.int64) * 3, image, tmp_path / "out" / "ct")
    assert out.name == "ct.nii.gz"
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), label)
    assert back.get_data_dtype() == np.uint8


def test_nifti_multichannel_4d(tmp_path):
    data = np.zeros((6, 5, 4, 2), np.float32)
    data[..., 1] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mc.nii"))
    image = read_image(tmp_path / "mc.nii")
    assert image.array.shape == (2, 6, 5, 4) and image.array[1].min() == 1
    out = write_label(np.ones((6, 5, 4), int), image, tmp_path / "lab")
    assert out.name == "lab.nii.gz" and nib.load(str(out)).shape == (6, 5, 4)


def test_mha_label_keeps_spacing_origin_direction(tmp_path):
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((-5.0, 12.0, 3.5))
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(tmp_path / "mr.mha"))
    stored = read_image(tmp_path / "mr.mha", orientation="none")
    assert stored.array.shape == (1, 6, 5, 4)  # (x, y, z), as a NIfTI of it reads
    assert stored.spacing == pytest.approx((0.7, 0.8, 3.0))
    image = read_image(tmp_path / "mr.mha")  # x runs anterior, y left (ITK's LPS direction): RAS swaps them
    assert image.array.shape == (1, 5, 6, 4)
    assert image.spacing == pytest.approx((0.8, 0.7, 3.0))
    back = sitk.ReadImage(str(write_label((image.array[0] > 50).astype(int), image, tmp_path / "mr_label")))
    label = (sitk.GetArrayFromImage(img) > 50).astype(int)  # the source's own (z, y, x) order
    assert back.GetSpacing() == pytest.approx((0.7, 0.8, 3.0))
    assert back.GetOrigin() == pytest.approx((-5.0, 12.0, 3.5))
    assert back.GetDirection() == pytest.approx(direction)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)


def test_2d_rgb_and_grey_png(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (9, 11, 3), dtype=np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "a.jpg")
    image = read_image(tmp_path / "a.jpg")
    assert image.array.shape == (3, 9, 11)
    out = write_label(np.full((9, 11), 255), image, tmp_path / "labels" / "a")
    assert out.suffix == ".png"  # labels are never written lossy
    assert np.asarray(PILImage.open(out)).max() == 255


def test_case_names_and_lists(tmp_path):
    assert case_name(tmp_path / "x.nii.gz") == "x" and case_name(tmp_path / "y.png") == "y"
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a", "b"], "note": "x"}))
    assert read_case_list(f"{tmp_path / 's.json'}:train") == ["a", "b"]
    with pytest.raises(NaktError, match="no entry 'test'"):
        read_case_list(f"{tmp_path / 's.json'}:test")


def test_discover_pairs_by_stem_and_case_folders(tmp_path):
    from conftest import write_volume_case

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img" / "c1.jpg")
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "msk" / "c1.png")
    [case] = discover_cases(tmp_path / "img", tmp_path / "msk", require_masks=True)
    assert case.name == "c1" and case.mask.name == "c1.png"

    write_volume_case(tmp_path / "vols", "p1", rng)
    [vol] = discover_cases(tmp_path / "vols", tmp_path / "vols", channels=["t1c*", "flair*"],
                           mask_file="seg*", require_masks=True)
    assert [p.name for p in vol.images] == ["t1c.nii.gz", "flair.nii.gz"] and vol.mask.name == "seg.nii.gz"
    assert read_image(vol.images).array.shape == (2, 24, 20, 16)


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(NaktError, match="broken.png: cannot read image"):
        read_image(tmp_path / "broken.png")
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img.png")
    PILImage.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(NaktError, match=r"mask.png: mask size \(5, 4\) differs"):
        read_mask(tmp_path / "mask.png", like=read_image(tmp_path / "img.png"))
    with pytest.raises(NaktError, match="images folder not found"):
        discover_cases(tmp_path / "missing")
    (tmp_path / "nomasks").mkdir()
    with pytest.raises(NaktError, match="no mask for case 'img'"):
        discover_cases(tmp_path, tmp_path / "nomasks", cases=["img"], require_masks=True)


def test_dicom_series_folder_reads_as_one_volume(tmp_path):
    volume = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 50).astype(np.int16)  # z, y, x
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.5, 0.6, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    series = tmp_path / "patient1"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[0]):
        sl = img[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(series / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    [case] = discover_cases(tmp_path)
    assert case.name == "patient1" and case.images == [series]
    image = read_image(case.images)
    assert image.array.shape == (1, 7, 6, 5)
    assert image.spacing == pytest.approx((0.5, 0.6, 2.0))
    # identity LPS direction: x runs left and y posterior, so RAS flips both
    np.testing.assert_array_equal(image.array[0], volume.transpose(2, 1, 0)[::-1, ::-1])
    out = write_label((image.array[0] > 20).astype(int), image, tmp_path / "labels" / "patient1")
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume > 20)
    assert out.name == "patient1.nii.gz" and back.GetSpacing() == pytest.approx((0.5, 0.6, 2.0))
    assert back.GetOrigin() == pytest.approx((1.0, 2.0, 3.0), abs=1e-4)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_masks_read_as_indices(tmp_path, suffix):
    """A palette label map's labels are its indices (DRIVE's second observer: index 1 is coloured grey 252)."""
    labels = np.zeros((6, 5), dtype=np.uint8)
    labels[1:3, 1:4], labels[4, :] = 1, 2
    pil = PILImage.fromarray(labels, mode="P")
    pil.putpalette([4, 2, 4, 252, 254, 252, 200, 0, 0] + [0] * 759)
    pil.save(tmp_path / f"m{suffix}")
    np.testing.assert_array_equal(read_mask(tmp_path / f"m{suffix}"), labels)
    assert read_image(tmp_path / f"m{suffix}").array.shape == (3, 6, 5)  # as an image, the colours


def test_text_files_are_read_as_utf8_under_an_ascii_locale(tmp_path):
    """Case lists, splits and configs written on another machine may name cases with accents; an ASCII locale
    (a CI runner, a cluster node, or a library that called setlocale) must not change how nakt reads them."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "cases.json").write_text('["café_01", "naïve_02"]', encoding="utf-8")
    code = ("import sys; from nakt.io.dataset import read_case_list; "
            "print(read_case_list(sys.argv[1]) == ['caf\\u00e9_01', 'na\\u00efve_02'])")  # ASCII command line
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cases.json")], env=env,
                          capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip() == "True"
