"""One axis convention for every format: the same volume stored as NIfTI, MHA, NRRD, a DICOM series or a
permuted/flipped NIfTI reads to one array, and labels go back in each source's own order and geometry."""

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from nakt.errors import NaktError
from nakt.io.images import read_image, read_mask, write_label

# An oblique-free but non-trivial ITK direction (row-major; a rotation, as DICOM needs): x runs anterior,
# y inferior, z left, so no storage axis is already where RAS wants it.
DIRECTION = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SPACING = (0.8, 1.1, 2.5)  # x, y, z
ORIGIN = (-12.3, 40.1, 7.5)
FORMATS = ("nii", "mha", "nrrd", "dicom", "flipped")


def _volume(seed: int, shape=(12, 18, 20)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 (z, y, x) volume with an off-centre ellipsoid (its mask returned too) and an intensity ramp,
    so that any transposition or flip changes it."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.25, 0.25, 3)
    mask = (((z - c[0]) / 0.6) ** 2 + ((y - c[1]) / 0.45) ** 2 + ((x - c[2]) / 0.35) ** 2 < 1).astype(np.uint8)
    ramp = 20 * x + 10 * y + 5 * z
    return (mask * 200 + ramp + rng.normal(0, 15, shape)).astype(np.int16), mask


def _sitk_image(array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def _write_dicom_series(img: sitk.Image, folder) -> None:
    """One int16 slice per file, with the position and row/column cosines that rebuild `img`'s geometry."""
    folder.mkdir(parents=True)
    d = img.GetDirection()
    cosines = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(img.GetSize()[2]):
        sl = img[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.7")
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0037", cosines)
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def _flipped_nifti(source, path) -> None:
    """The NIfTI at `source` with its storage axes permuted and flipped, the affine adjusted by hand so the
    physical image is unchanged: new voxel (a, b, c) is old voxel (b, J-1-c, K-1-a)."""
    img = nib.load(str(source))
    data = np.asarray(img.dataobj)
    _, J, K = data.shape
    new = data.transpose(2, 0, 1)[::-1, :, ::-1]
    old_from_new = np.array([[0, 1, 0, 0], [0, 0, -1, J - 1], [-1, 0, 0, K - 1], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(new), img.affine @ old_from_new), str(path))


def write_copies(array: np.ndarray, folder, name: str = "ct") -> dict:
    """`array` (z, y, x) as NIfTI, MHA, NRRD, a DICOM series and a flipped NIfTI: format -> case path."""
    folder.mkdir(parents=True, exist_ok=True)
    img = _sitk_image(array)
    paths = {"nii": folder / f"{name}_nii.nii.gz", "mha": folder / f"{name}_mha.mha",
             "nrrd": folder / f"{name}_nrrd.nrrd", "dicom": folder / f"{name}_dicom",
             "flipped": folder / f"{name}_flipped.nii.gz"}
    for fmt in ("nii", "mha", "nrrd"):
        sitk.WriteImage(img, str(paths[fmt]))  # ITK's own NIfTI writer: an independent LPS -> RAS conversion
    _write_dicom_series(img, paths["dicom"])
    _flipped_nifti(paths["nii"], paths["flipped"])
    return paths


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    array, mask = _volume(0)
    return array, mask, write_copies(array, tmp_path_factory.mktemp("copies"))


def _geometry(path) -> tuple:
    """What a writer must keep: the NIfTI affine, or ITK's spacing/origin/direction."""
    if str(path).endswith(".nii.gz") and not path.is_dir():
        return ("affine", nib.load(str(path)).affine)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    return ("itk", np.r_[img.GetSpacing(), img.GetOrigin(), img.GetDirection()])


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "pil"])
def test_every_format_reads_to_one_array(copies, orientation):
    array, _, paths = copies
    images = {fmt: read_image(p, orientation=orientation) for fmt, p in paths.items()}
    ref = images["nii"]
    assert ref.orientation == orientation.upper()
    for fmt, image in images.items():
        np.testing.assert_array_equal(image.array, ref.array, err_msg=fmt)
        assert image.array.flags.c_contiguous
        assert image.spacing == pytest.approx(ref.spacing, abs=1e-4), fmt
        np.testing.assert_allclose(image.affine, ref.affine, atol=1e-3, err_msg=fmt)
    if orientation == "RAS":  # the direction is a signed permutation: RAS makes the affine diagonal, positive
        np.testing.assert_allclose(ref.affine[:3, :3], np.diag(ref.spacing), atol=1e-6)
        # x runs anterior (axis 1), y inferior (axis 2, flipped), z left (axis 0, flipped)
        np.testing.assert_array_equal(ref.array[0], array.transpose(0, 2, 1)[::-1, :, ::-1])
        assert ref.spacing == pytest.approx((2.5, 0.8, 1.1))


def test_orientation_none_is_storage_order_in_one_index_convention(copies):
    array, _, paths = copies
    for fmt in ("nii", "mha", "nrrd", "dicom"):  # all store x, y, z; SimpleITK's (z, y, x) is transposed
        image = read_image(paths[fmt], orientation="none")
        assert image.orientation == "none" and image.ornt is None
        np.testing.assert_array_equal(image.array[0], array.transpose(2, 1, 0), err_msg=fmt)
        assert image.spacing == pytest.approx(SPACING, abs=1e-4)
    assert read_image(paths["flipped"], orientation="none").spatial_shape == (12, 20, 18)


def test_read_mask_follows_its_image(copies, tmp_path):
    array, mask, paths = copies
    sitk.WriteImage(_sitk_image(mask), str(tmp_path / "seg.mha"))
    for orientation in ("RAS", "PIL"):
        image = read_image(paths["flipped"], orientation=orientation)  # the image stored another way round
        got = read_mask(tmp_path / "seg.mha", like=image)
        ref = read_image(paths["mha"], orientation=orientation)
        np.testing.assert_array_equal(got, read_mask(tmp_path / "seg.mha", like=ref))
        assert got.dtype == np.int64 and got.sum() == mask.sum()
        # the mask lies where the bright ellipsoid is in the image's own array
        assert (image.array[0][got == 1] > 100).mean() > 0.95
    with pytest.raises(NaktError, match=r"mask size \(20, 18, 12\) differs from its image's \(12, 20, 18\)"):
        read_mask(tmp_path / "seg.mha", like=read_image(paths["flipped"], orientation="none"))  # storage orders


def test_read_mask_size_mismatch_is_named_after_reorientation(copies, tmp_path):
    _, mask, paths = copies
    sitk.WriteImage(_sitk_image(mask[:, :, :-1]), str(tmp_path / "short.mha"))
    with pytest.raises(NaktError, match=r"short.mha: mask size \(12, 19, 18\) differs"):
        read_mask(tmp_path / "short.mha", like=read_image(paths["nii"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_label_round_trips_in_source_order_and_geometry(copies, tmp_path, fmt):
    array, _, paths = copies
    image = read_image(paths[fmt])
    label = (image.array[0] > 100).astype(np.int64) * 2  # the intensity ramp makes it asymmetric
    out = write_label(label, image, tmp_path / "labels" / f"ct_{fmt}")
    assert out.name == f"ct_{fmt}" + {"mha": ".mha", "nrrd": ".nrrd"}.get(fmt, ".nii.gz")
    np.testing.assert_array_equal(read_mask(out, like=image), label)  # read back, reoriented the same way
    stored = read_image(out, orientation="none").array[0]  # the file holds the source's storage order
    source = read_image(paths[fmt], orientation="none").array[0]
    np.testing.assert_array_equal(stored > 0, source > 100)
    if fmt != "flipped":  # sources storing x, y, z: also check the file's raw array
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        np.testing.assert_array_equal(raw > 0, array > 100)
    kind, want = _geometry(paths[fmt])
    got_kind, got = _geometry(out)
    assert got_kind == kind or fmt == "dicom", fmt
    if fmt == "dicom":  # written as NIfTI with the series' geometry: compare through ITK
        _, want = _geometry(paths[fmt])
        back = sitk.ReadImage(str(out))
        got = np.r_[back.GetSpacing(), back.GetOrigin(), back.GetDirection()]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_2d_medical_files_read_as_rows_and_columns(tmp_path):
    """One 2D image as PNG, 2D MHA, and 2D NIfTI (written by ITK and by nibabel) gives one array."""
    pixels = np.random.default_rng(3).integers(0, 255, (9, 13), dtype=np.uint8)  # rows, columns
    PILImage.fromarray(pixels).save(tmp_path / "a.png")
    img = sitk.GetImageFromArray(pixels)
    img.SetSpacing((0.5, 0.7))  # x (columns), y (rows)
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    sitk.WriteImage(img, str(tmp_path / "a_itk.nii.gz"))
    nib.save(nib.Nifti1Image(pixels.T.copy(), np.diag([0.5, 0.7, 1, 1])), str(tmp_path / "a_nib.nii.gz"))
    for name in ("a.png", "a.mha", "a_itk.nii.gz", "a_nib.nii.gz"):
        image = read_image(tmp_path / name, orientation="LPS")  # orientation does not apply to 2D
        np.testing.assert_array_equal(image.array, pixels[None], err_msg=name)
        assert image.orientation == "none"
        if name != "a.png":
            assert image.spacing == pytest.approx((0.7, 0.5)), name  # per array axis: rows, columns
            label = (pixels > 128).astype(np.int64)
            out = write_label(label, image, tmp_path / "labels" / name.split(".")[0])
            np.testing.assert_array_equal(read_mask(out, like=image), label)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), label)


def test_bad_orientation_is_refused(copies):
    from nakt.models.card import ModelCard

    with pytest.raises(NaktError, match="unknown orientation 'RAR'"):
        read_image(copies[2]["nii"], orientation="RAR")
    with pytest.raises(NaktError, match=r"unknown orientation 'xyz' \(use 'none' or an axis code such as RAS"):
        ModelCard("monai:UNet", 1, 2, spatial_dims=3, orientation="xyz")
    assert ModelCard("monai:UNet", 1, 2, orientation="las").orientation == "LAS"
    assert ModelCard("monai:UNet", 1, 2, orientation="None").orientation == "none"
    assert ModelCard("monai:UNet", 1, 2).orientation == "RAS"


def _run_dir(tmp_path, spatial_dims: int):
    """A run directory as nakt train writes it, minus the orientation key (a run from before it existed)."""
    from nakt.io import rundir
    from nakt.models import ModelCard, build_model

    card = ModelCard("monai:UNet", 1, 2, spatial_dims=spatial_dims, patch=[32])
    run = tmp_path / f"run{spatial_dims}d"
    run.mkdir()
    rundir.write_config(run, card, {})
    rundir.write_weights(run, build_model(card))
    config = json.loads((run / "config.json").read_text())
    assert config.pop("orientation") == "RAS"
    (run / "config.json").write_text(json.dumps(config))
    return run, config


def test_legacy_3d_run_is_refused_until_its_orientation_is_stated(tmp_path):
    import nakt

    run, config = _run_dir(tmp_path, 3)
    with pytest.raises(NaktError) as err:
        nakt.load(run)
    message = str(err.value)
    assert "\n" not in message and "config.json" in message and "predates" in message
    assert '"orientation": "none"' in message and "retrain" in message
    (run / "config.json").write_text(json.dumps({**config, "orientation": "none"}))
    assert nakt.load(run).card.orientation == "none"
    run2d, _ = _run_dir(tmp_path, 2)  # 2D runs are untouched by orientation and load as before
    assert nakt.load(run2d).card.spatial_dims == 2
    assert nakt.load("monai:UNet", in_channels=1, classes=2, spatial_dims=3).card.orientation == "RAS"


def test_one_teacher_labels_every_format_alike(tmp_path):
    """The issue's end-to-end check: a teacher labels one volume stored five ways; every label, read back and
    reoriented to RAS, is the same, and each is written in its source's format and geometry."""
    import nakt

    for i in (1, 2):
        array, mask = _volume(i)
        for folder, data in (("train_img", array), ("train_msk", mask)):
            (tmp_path / folder).mkdir(exist_ok=True)
            sitk.WriteImage(_sitk_image(data), str(tmp_path / folder / f"t{i}.nii.gz"))
    run = nakt.train(model="monai:UNet", images=tmp_path / "train_img", masks=tmp_path / "train_msk",
                     out=tmp_path / "teacher", size=[32], epochs=6, batch_size=2, val_fraction=0, lr=1e-2,
                     augment=False, precision="fp32", progress=False, device="cpu")  # sure to segment something
    assert json.loads((run / "config.json").read_text())["orientation"] == "RAS"
    paths = write_copies(_volume(0)[0], tmp_path / "unlabelled")
    out = nakt.label(teacher=[run], images=tmp_path / "unlabelled", out=tmp_path / "labels", progress=False,
                     device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    labels = {}
    for fmt, source in paths.items():
        written = out / manifest["cases"][source.name.split(".")[0]]["mask"]
        assert written.name.endswith({"mha": ".mha", "nrrd": ".nrrd"}.get(fmt, ".nii.gz")), fmt
        labels[fmt] = read_mask(written, like=read_image(source))
        kind, want = _geometry(source)
        if fmt == "dicom":  # a series is written as NIfTI with its geometry
            back = sitk.ReadImage(str(written))
            got = np.r_[back.GetSpacing(), back.GetOrigin(), back.GetDirection()]
        else:
            got = _geometry(written)[1]
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=fmt)
    assert labels["nii"].any() and not labels["nii"].all()  # the comparison is not between blank labels
    for fmt, lab in labels.items():
        np.testing.assert_array_equal(lab, labels["nii"], err_msg=f"{fmt} label differs from the NIfTI one")
