"""`nakt export-nnunet`: a label set plus its images as an nnU-Net v2 raw dataset, so an nnU-Net is the student.

Writes ``<nnUNet_raw>/DatasetNNN_Name/``: ``imagesTr/<case>_0000.<ext>`` (one file per channel), ``labelsTr/
<case>.<ext>`` with consecutive labels 0..C-1, ``dataset.json`` and nakt's marker ``nakt_export.json``.

- 2D raster images become PNGs, as nnU-Net's ``NaturalImage2DIO`` reads them: a grey PNG is one channel, an RGB
  PNG one ``_0000.png`` file with three channels (channel names R, G, B). PNGs in grey or RGB are copied byte
  for byte; other raster files (JPEG, TIFF, palette or RGBA PNGs) are converted, as nakt reads them.
- Volumes (and 2D medical files) become ``.nii.gz`` in the source's own geometry and storage order: NIfTI files
  are copied (``.nii`` gzipped), other formats converted by SimpleITK, 4D NIfTI split into one file per
  channel. nakt's reoriented arrays are never written, so nnU-Net sees what a scanner wrote.
- Labels: the label set's masks (in the source's format and geometry, paired by case name) with each label
  value replaced by its class index in the manifest's ``label_values`` order (value 0, if present, first: it is
  nnU-Net's background). Only cases present in the label set's manifest are exported.
"""

from __future__ import annotations

import gzip
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nakt.config import OptionError, check_options, option
from nakt.errors import NaktError
from nakt.io import labelset
from nakt.io.dataset import Case, discover_cases
from nakt.io.images import SUFFIXES_2D, SUFFIXES_NIFTI, _suffix, case_name, read_image, read_mask
from nakt.io.outputs import OutputKind, atomic_path, fresh_output
from nakt.io.rundir import write_json
from nakt.version import __version__

__all__ = ["EXPORT_FORMAT", "NNUNET_EXPORT", "ExportNnunetOptions", "export_nnunet"]

EXPORT_FORMAT = "nakt.nnunet_export/1"
# Our own marker, not dataset.json: a user's hand-made nnU-Net dataset has a dataset.json too, and must be refused.
NNUNET_EXPORT = OutputKind("nnU-Net export", "nakt_export.json", "nakt.nnunet_export/",
                           ("nakt_export.json", "dataset.json", "imagesTr", "labelsTr"))
DATASET_NAME = re.compile(r"Dataset\d{3}_\w+")


@dataclass
class ExportNnunetOptions:
    """Options of `export_nnunet` (flag names of ``nakt export-nnunet``). `out` is the dataset folder inside
    nnU-Net's raw folder, named ``DatasetNNN_Name``; `cases` and `channels` select cases and modality files as
    for ``nakt label``; `channel_names` name the channels in dataset.json (nnU-Net picks its normalisation by
    them: ``CT`` for Hounsfield units, anything else z-scores)."""

    labels: str = option(help="label set written by nakt label", group="data")
    images: str = option(help="the images the label set labels", group="data")
    out: str = option(help="<nnUNet_raw>/DatasetNNN_Name", group="output")
    cases: str | None = None
    channels: list[str] | None = None
    channel_names: list[str] | None = option(None, "nnU-Net channel names (CT for Hounsfield units)", group="data")
    overwrite: bool = option(False, "replace an earlier nakt export", group="output")

    def __post_init__(self) -> None:
        check_options(self, {})
        if not DATASET_NAME.fullmatch(Path(self.out).name):
            raise OptionError("out", f"nnU-Net dataset folders are named DatasetNNN_Name, got {Path(self.out).name!r}",
                              "e.g. $nnUNet_raw/Dataset501_Lungs")


def _class_order(values: list[int]) -> list[int]:
    """The label values in class-index order: the manifest's, with 0 moved first (nnU-Net's background is 0).

    >>> _class_order([0, 255]), _class_order([1, 0, 2])
    ([0, 255], [0, 1, 2])
    """
    return [0, *[v for v in values if v != 0]] if 0 in values else list(values)


def _label_names(manifest: dict, values: list[int]) -> dict[str, int]:
    """dataset.json's ``labels``: ``{"background": 0, <class name or label_<value>>: index, ...}``."""
    own = [int(v) for v in manifest["label_values"]]
    names = manifest.get("class_names")
    by_value = dict(zip(own, names)) if isinstance(names, list) and len(names) == len(own) else {}
    labels: dict[str, int] = {}
    for index, value in enumerate(values):
        named = str(by_value.get(value, value)) != str(value)  # an unnamed class carries its value as name
        name = "background" if index == 0 else str(by_value[value]) if named else f"label_{value}"
        if name in labels or (index > 0 and name == "background"):  # names are keys: keep them distinct
            name = f"{name}_{value}"
        labels[name] = index
    return labels


def _to_indices(mask: np.ndarray, values: list[int], path: Path) -> np.ndarray:
    """Label values -> class indices (uint8); a value outside the label set's is an error naming it."""
    out = np.zeros(mask.shape, np.uint8)
    known = np.zeros(mask.shape, bool)
    for index, value in enumerate(values):
        hit = mask == value
        out[hit], known[hit] = index, True
    if not known.all():
        raise NaktError(path, f"holds label value {int(mask[~known].flat[0])}, not among the label set's {values}")
    return out


# ---- 2D raster: PNG -----------------------------------------------------------------------------------------


def _png_image(src: Path, dst: Path) -> int:
    """Write one 2D raster image as the PNG nnU-Net reads; returns its channel count (1 grey, 3 RGB)."""
    from PIL import Image as PILImage

    if _suffix(src) == ".png":
        with PILImage.open(src) as pil:
            mode = pil.mode
        if mode in ("L", "RGB"):  # already what NaturalImage2DIO reads as 1 or 3 channels: copy it unchanged
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            return 1 if mode == "L" else 3
    arr = read_image(src).array  # [C, H, W]: palette -> RGB, alpha dropped, as nakt's teachers saw it
    channels = arr.shape[0]
    if channels not in (1, 3) or np.any(arr != np.round(arr)) or arr.min() < 0 or arr.max() > 65535:
        raise NaktError(src, f"cannot be stored losslessly as a grey or RGB PNG ({channels} channel(s), "
                        f"values {arr.min():g}..{arr.max():g})", "convert it to 8-bit grey or RGB first")
    if arr.max() > 255 and channels == 3:
        raise NaktError(src, "16-bit colour images cannot be written as PNG here", "convert it to 8-bit RGB")
    dtype = np.uint8 if arr.max() <= 255 else np.uint16
    data = arr[0].astype(dtype) if channels == 1 else np.moveaxis(arr, 0, -1).astype(dtype)
    with atomic_path(dst) as tmp:
        PILImage.fromarray(data).save(tmp, format="PNG")
    return channels


def _png_label(src: Path, dst: Path, values: list[int], shape: tuple[int, ...]) -> None:
    from PIL import Image as PILImage

    mask = read_mask(src)  # (rows, columns): the same grid as the image PNG
    if mask.shape != shape:
        raise NaktError(src, f"mask size {mask.shape} differs from its image's {shape}")
    with atomic_path(dst) as tmp:
        PILImage.fromarray(_to_indices(mask, values, src)).save(tmp, format="PNG")


# ---- volumes and 2D medical files: NIfTI --------------------------------------------------------------------


def _nifti_images(src: Path, dst_stem: Path, first: int) -> tuple[int, tuple[int, ...]]:
    """Write `src`'s channels as ``<dst_stem>_<first + c:04d>.nii.gz`` in its own geometry; returns the channel
    count and the spatial shape in storage order (i, j[, k])."""
    s = _suffix(src)
    if s in SUFFIXES_NIFTI and src.is_file():
        import nibabel as nib

        img = nib.load(str(src))
        if len(img.shape) == 4:  # channels on the last axis: nnU-Net wants one file per channel
            for c in range(img.shape[3]):
                with atomic_path(Path(f"{dst_stem}_{first + c:04d}.nii.gz")) as tmp:
                    nib.save(img.slicer[..., c], str(tmp))
            return img.shape[3], tuple(img.shape[:3])
        with atomic_path(Path(f"{dst_stem}_{first:04d}.nii.gz")) as tmp:
            if s == ".nii.gz":
                shutil.copyfile(src, tmp)
            else:  # a gzipped .nii is a valid .nii.gz, byte for byte the same header and data
                with open(src, "rb") as f_in, gzip.open(tmp, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
        return 1, tuple(img.shape)
    img = _read_sitk(src)
    size = tuple(img.GetSize())  # (x, y[, z]) = (i, j[, k])
    import SimpleITK as sitk

    for c in range(img.GetNumberOfComponentsPerPixel()):
        part = sitk.VectorIndexSelectionCast(img, c) if img.GetNumberOfComponentsPerPixel() > 1 else img
        with atomic_path(Path(f"{dst_stem}_{first + c:04d}.nii.gz")) as tmp:
            # SimpleITK converts ITK's LPS geometry into the NIfTI header (the writer is picked by the ending)
            sitk.WriteImage(part, str(tmp), useCompression=True)
    return img.GetNumberOfComponentsPerPixel(), size


def _read_sitk(src: Path):
    import SimpleITK as sitk

    try:
        if src.is_dir():  # a DICOM series folder
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
            return reader.Execute()
        return sitk.ReadImage(str(src))
    except Exception as exc:
        raise NaktError(src, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None


def _nifti_label(src: Path, dst: Path, values: list[int], shape: tuple[int, ...]) -> None:
    """A label-set mask (NIfTI, or a SimpleITK format) -> class indices as .nii.gz in the mask's own geometry."""
    if _suffix(src) in SUFFIXES_NIFTI:
        import nibabel as nib

        img = nib.load(str(src))
        mask = np.asarray(img.dataobj)
        if tuple(mask.shape) != shape:
            raise NaktError(src, f"mask size {mask.shape} differs from its image's {shape}")
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        with atomic_path(dst) as tmp:  # the temporary name ends like `dst`, so nibabel gzips it
            nib.save(nib.Nifti1Image(_to_indices(mask, values, src), img.affine, header), str(tmp))
        return
    import SimpleITK as sitk

    img = _read_sitk(src)
    if tuple(img.GetSize()) != shape:
        raise NaktError(src, f"mask size {tuple(img.GetSize())} differs from its image's {shape}")
    indexed = sitk.GetImageFromArray(_to_indices(sitk.GetArrayFromImage(img), values, src))
    indexed.CopyInformation(img)
    with atomic_path(dst) as tmp:
        sitk.WriteImage(indexed, str(tmp), useCompression=True)


# ---- the export ---------------------------------------------------------------------------------------------


def _mask_of(label_set: Path, manifest: dict, name: str) -> Path:
    entry = manifest["cases"][name]
    mask = label_set / entry["mask"] if isinstance(entry, dict) and entry.get("mask") else None
    if mask is None:
        hits = sorted((label_set / "masks").glob(f"{name}.*"))
        mask = hits[0] if hits else label_set / "masks" / name
    if not mask.is_file():
        raise NaktError(mask, f"the label set lists case {name!r} but its mask is missing")
    return mask


def _default_channel_names(case: Case, channels: int, raster: bool) -> list[str]:
    """R, G, B for colour raster images; the modality files' names for case folders; else ``image``."""
    if raster and channels == 3:
        return ["R", "G", "B"]
    if len(case.images) == channels and case.images[0].parent.name == case.name and channels > 1:
        return [case_name(p) for p in case.images]
    return ["image"] if channels == 1 else [f"channel_{c}" for c in range(channels)]


def export_nnunet(opts: ExportNnunetOptions) -> Path:
    """Write the label set ``opts.labels`` with its images as an nnU-Net v2 raw dataset in ``opts.out``."""
    label_set = Path(opts.labels)
    manifest = labelset.read_manifest(label_set)
    if manifest.get("task", "segmentation") != "segmentation":
        raise NaktError(label_set, f"is a {manifest.get('task')} label set", "nnU-Net learns segmentation only")
    values = _class_order([int(v) for v in manifest.get("label_values", [])])
    if len(values) < 2:
        raise NaktError(label_set / labelset.MANIFEST, "lists fewer than two label values")
    labelled = manifest.get("cases") or {}
    cases = [c for c in discover_cases(opts.images, cases=opts.cases, channels=opts.channels) if c.name in labelled]
    if not cases:
        raise NaktError(opts.images, f"none of its cases is in the label set {label_set}",
                        "pass the --images folder the label set was made from")
    raster = {_suffix(c.images[0]) in SUFFIXES_2D and c.images[0].is_file() for c in cases}
    if len(raster) > 1:
        raise NaktError(opts.images, "mixes 2D raster images with medical files", "export them separately")
    raster_2d = raster.pop()
    ending = ".png" if raster_2d else ".nii.gz"
    masks = {c.name: _mask_of(label_set, manifest, c.name) for c in cases}  # all present before writing

    out = Path(opts.out)
    with fresh_output(out, NNUNET_EXPORT, opts.overwrite):
        # the marker first, so an interrupted export is still recognised (and replaced with --overwrite)
        marker = {"format": EXPORT_FORMAT, "nakt_version": __version__, "label_set": str(label_set.resolve()),
                  "images": str(Path(opts.images).resolve()), "label_values": values,
                  "cases": [c.name for c in cases]}
        write_json(out / NNUNET_EXPORT.marker, marker)
        names: list[str] | None = None
        for case in cases:
            stem = out / "imagesTr" / case.name
            count = 0
            if raster_2d:
                for src in case.images:
                    count += _png_image(src, Path(f"{stem}_{count:04d}.png"))
                shape = read_image(case.images[0]).spatial_shape
                _png_label(masks[case.name], out / "labelsTr" / f"{case.name}.png", values, shape)
            else:
                for src in case.images:
                    added, shape = _nifti_images(src, stem, count)
                    count += added
                _nifti_label(masks[case.name], out / "labelsTr" / f"{case.name}.nii.gz", values, shape)
            if names is None:  # the first case fixes the channels (and their names) for all
                n_channels, first_case = count, case
                names = opts.channel_names or _default_channel_names(case, count, raster_2d)
                if len(names) != count:
                    raise OptionError("channel_names", f"{len(names)} names for {count} channel(s)")
            elif count != n_channels:
                raise NaktError(case.images[0], f"case {case.name!r} has {count} channel(s), "
                                f"{first_case.name!r} has {n_channels}", "nnU-Net needs one channel count")
        dataset = {"channel_names": {str(i): n for i, n in enumerate(names)},
                   "labels": _label_names(manifest, values), "numTraining": len(cases), "file_ending": ending,
                   "name": out.name.split("_", 1)[1],
                   # the label set's own values per nnU-Net label, so an nnunet: teacher gives them back
                   "nakt_label_values": [int(v) for v in values],
                   "description": f"exported by nakt {__version__} from the label set {label_set.resolve()}"}
        write_json(out / "dataset.json", dataset)  # last: nnU-Net sees a dataset only once it is complete
    return out
