"""Reading images and masks with their geometry, and writing labels back in the source's format and geometry.

Arrays are channel-first: an image is ``[C, *spatial]`` float32, a mask ``[*spatial]`` integer. The spatial
axes follow one convention whatever the file format, so a model sees the same array for the same image:

- 3D volumes (NIfTI, MHA/MHD, NRRD/NHDR, DICOM series folders, .dcm) are reoriented to one anatomical
  orientation, ``RAS`` by default (any nibabel axis code such as ``LPS`` or ``LAS``): array axis 0 runs
  towards the first letter, and so on. Axes are only permuted and flipped (an oblique volume goes to its
  nearest axes), never resampled; spacing is per array axis. ``orientation="none"`` keeps the storage order,
  indexed (i, j, k) for every format: NIfTI's own order, and (x, y, z) for SimpleITK formats, whose numpy
  arrays are (z, y, x).
- 2D files are (rows, columns), as a PNG is displayed: 2D MHA/NRRD as SimpleITK returns them (y, x), 2D NIfTI
  transposed from its (i, j) = (x, y) storage, so one 2D image stored as PNG, MHA or NIfTI gives one array.
  Orientation does not apply to 2D files.

`Image` keeps the transform applied, so a label on its grid is written back in the source's storage order,
format and geometry (`write_label`) and overlays it in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nakt.errors import NaktError
from nakt.io.outputs import atomic_path

__all__ = [
    "IMAGE_SUFFIXES",
    "Image",
    "atomic_path",
    "case_name",
    "is_image_file",
    "label_suffix",
    "orientation_code",
    "read_image",
    "read_mask",
    "write_label",
]

SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
SUFFIXES_NIFTI = (".nii.gz", ".nii")
SUFFIXES_SITK = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
IMAGE_SUFFIXES = SUFFIXES_NIFTI + SUFFIXES_SITK + SUFFIXES_2D


def orientation_code(code: str) -> str:
    """``"none"`` or a 3-letter axis code using each of L/R, A/P, S/I once, upper-cased (``"las"`` -> ``"LAS"``).

    >>> orientation_code("lps"), orientation_code("None")
    ('LPS', 'none')
    """
    text = str(code)
    if text.lower() == "none":
        return "none"
    text = text.upper()
    if len(text) != 3 or any(sum(c in pair for c in text) != 1 for pair in ("LR", "AP", "SI")):
        raise NaktError(None, f"unknown orientation {code!r}",
                        "use 'none' or an axis code such as RAS, LPS, LAS or PSL")
    return text


@dataclass
class Image:
    """An image as a channel-first array plus what is needed to write a label on its grid.

    `kind` is ``"2d"`` (raster files), ``"nifti"`` or ``"sitk"``; `spacing` is per array axis (mm, or 1 for
    raster files), after reorientation. `orientation` is the axis code applied to a 3D volume, or ``"none"``;
    `ornt` the nibabel orientation transform from storage (i, j, k) to the array's axes (None: identity);
    `affine` the array's voxel-to-world RAS affine (3D only); `storage_shape` the spatial shape in storage
    order (i, j[, k]); `meta` holds the writer's geometry (NIfTI affine and header, SimpleITK
    origin/direction/spacing).
    """

    array: np.ndarray
    path: Path
    kind: str
    spacing: tuple[float, ...]
    meta: dict = field(default_factory=dict)
    orientation: str = "none"
    ornt: np.ndarray | None = None
    affine: np.ndarray | None = None
    storage_shape: tuple[int, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def case_name(path: Path) -> str:
    """File name without its image extension (``a.nii.gz`` -> ``a``); folders keep their name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    s = _suffix(path)
    return path.name[: -len(s)] if s and path.name.lower().endswith(s) else path.stem


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and _suffix(path) in IMAGE_SUFFIXES


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _read_2d(path: Path, palette_indices: bool = False) -> Image:
    """A 2D raster file as ``[C, H, W]``; palette images as colours, or as their indices with `palette_indices`
    (the labels of a palette label map, which the palette only colours)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as pil:
            if pil.mode == "P" and not palette_indices:
                pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
            if pil.mode in ("RGBA", "LA"):
                pil = pil.convert(pil.mode[:-1])
            if pil.mode == "CMYK":
                pil = pil.convert("RGB")
            arr = np.asarray(pil)
    except Exception as exc:  # PIL raises many types for broken files
        try:  # multi-channel or float TIFFs that PIL cannot open
            from skimage import io as skio

            arr = np.asarray(skio.imread(str(path)))
        except Exception:
            raise NaktError(path, f"cannot read image ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise NaktError(path, f"expected a 2D grey or colour image, got an array of shape {arr.shape}")
    return Image(arr, path, "2d", (1.0, 1.0), storage_shape=arr.shape[1:])


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], dict]:
    """``[C, i, j(, k)]``, the voxel-to-world affine, spacing per (i, j(, k)), the writer's meta."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as exc:
        raise NaktError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 4:  # i, j, k, channel
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise NaktError(path, f"expected a 2D, 3D or 4D NIfTI, got {arr.ndim} dimensions")
    spacing = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim - 1])
    return arr, img.affine, spacing, {"affine": img.affine, "header": img.header}


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...], dict]:
    """Like `_read_nifti`: SimpleITK's (z, y, x) arrays transposed to (x, y, z) = (i, j, k); the affine (3D only)
    converted from ITK's LPS world to RAS, as MONAI's ITKReader does."""
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise RuntimeError("no DICOM series found")
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise NaktError(path, f"cannot read image ({str(exc).strip().splitlines()[-1]})") from None
    dims = img.GetDimension()
    if dims not in (2, 3):
        raise NaktError(path, f"expected a 2D or 3D image, got {dims} dimensions")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    arr = np.moveaxis(arr, -1, 0) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    arr = arr.transpose(0, *range(dims, 0, -1))
    affine = None
    if dims == 3:
        affine = np.eye(4)
        affine[:3, :3] = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())
        affine[:3, 3] = img.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    meta = {"affine": affine, "origin": img.GetOrigin(), "direction": img.GetDirection(),
            "spacing_xyz": img.GetSpacing()}
    return arr, affine, tuple(float(s) for s in img.GetSpacing()), meta


def _reorient(arr: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...], code: str, path: Path):
    """``[C, i, j, k]`` -> ``[C, *axes of code]``; returns the array, the nibabel transform, affine, spacing."""
    import nibabel.orientations as nio

    try:
        ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(code))
    except Exception as exc:  # a singular affine gives no orientation
        raise NaktError(path, f"cannot reorient to {code} ({exc})", "read it with orientation 'none'") from None
    moved = nio.apply_orientation(np.moveaxis(arr, 0, -1), ornt)  # applies to the leading (spatial) axes
    new_spacing = [0.0] * 3
    for axis, (to, _) in enumerate(ornt):
        new_spacing[int(to)] = spacing[axis]
    return np.moveaxis(moved, -1, 0), ornt, affine @ nio.inv_ornt_aff(ornt, arr.shape[1:]), tuple(new_spacing)


def _read_one(path: Path, orientation: str, palette_indices: bool = False) -> Image:
    if not path.exists():
        raise NaktError(path, "no such file or folder")
    s = _suffix(path)
    if _is_dicom_folder(path) or s in SUFFIXES_SITK or s in SUFFIXES_NIFTI:
        kind = "nifti" if s in SUFFIXES_NIFTI and not path.is_dir() else "sitk"
        arr, affine, spacing, meta = (_read_nifti if kind == "nifti" else _read_sitk)(path)
        image = Image(arr, path, kind, spacing, meta, storage_shape=arr.shape[1:])
        if arr.ndim == 3:  # 2D medical file: (i, j) = (x, y) -> (rows, columns), as a PNG of it reads
            image.array, image.spacing = arr.transpose(0, 2, 1), spacing[::-1]
        elif orientation == "none":
            image.affine = affine
        else:
            image.array, image.ornt, image.affine, image.spacing = _reorient(arr, affine, spacing, orientation, path)
            image.orientation = orientation
    elif s in SUFFIXES_2D:
        image = _read_2d(path, palette_indices)
    else:
        raise NaktError(path, f"unsupported image format {s!r}", f"supported: {', '.join(IMAGE_SUFFIXES)}")
    if not np.issubdtype(image.array.dtype, np.number) or image.array.dtype == np.bool_:
        image.array = image.array.astype(np.uint8)
    # one copy at most: float32, with the positive strides torch needs (flipped views have negative ones)
    image.array = np.ascontiguousarray(image.array, dtype=np.float32)
    if not np.isfinite(image.array).all():
        raise NaktError(path, "image holds NaN or infinite values")
    return image


def read_image(paths: Path | list[Path], orientation: str = "RAS") -> Image:
    """Read one image file, a DICOM series folder, or several modality files stacked as channels.

    Returns an `Image` whose array is ``[C, *spatial]`` float32, 3D volumes reoriented to `orientation` (a
    nibabel axis code, or ``"none"`` for storage order (i, j, k)); with several files, their channels are
    concatenated in the given order and the geometry is the first file's.
    """
    orientation = orientation_code(orientation)
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    images = [_read_one(p, orientation) for p in paths]
    first = images[0]
    for other in images[1:]:
        if other.spatial_shape != first.spatial_shape:
            raise NaktError(other.path, f"size {other.spatial_shape} differs from {first.path.name}'s "
                            f"{first.spatial_shape}", "modalities of a case must share one grid")
    if len(images) > 1:
        first.array = np.concatenate([im.array for im in images], axis=0)
    return first


def read_mask(path: Path, like: Image | None = None) -> np.ndarray:
    """Read a label map ``[*spatial]`` (integer label values as stored in the file; for palette images, the
    palette indices), a volume reoriented like `like` (RAS without it).

    With `like`, the mask must have the image's spatial size; colour masks keep their first channel.
    """
    path = Path(path)
    image = _read_one(path, like.orientation if like is not None else "RAS", palette_indices=True)
    arr = image.array
    if arr.shape[0] > 1:
        if image.kind == "2d":  # RGB(A) masks drawn in a paint program: every channel holds the label
            arr = arr[:1]
        else:
            raise NaktError(path, f"a mask needs one channel, found {arr.shape[0]}")
    mask = arr[0]
    if np.any(mask != np.round(mask)):
        raise NaktError(path, "mask holds non-integer values", "masks store integer labels")
    if like is not None and mask.shape != like.spatial_shape:
        raise NaktError(path, f"mask size {mask.shape} differs from its image's {like.spatial_shape} "
                        f"({like.path.name})")
    return mask.astype(np.int64)


def label_suffix(like: Image) -> str:
    """The extension a label written beside `like` gets: PNG for 2D (lossless), else the source's format."""
    if like.kind == "2d":
        return ".png"
    s = _suffix(like.path)
    if like.path.is_dir() or s == ".dcm":
        return ".nii.gz"
    return ".nii.gz" if s == ".nii" else s


def _to_storage(label: np.ndarray, like: Image) -> np.ndarray:
    """A label on `like`'s array grid -> the source's storage order: (rows, columns) for raster files, else
    (i, j[, k])."""
    if like.kind == "2d":
        return label
    if len(like.storage_shape) == 2:
        return label.T
    if like.ornt is None:
        return label
    import nibabel.orientations as nio

    # `ornt` sends storage axes to array axes; the transform from the array's own axes to it is its inverse
    identity = np.column_stack([np.arange(3), np.ones(3)])
    return nio.apply_orientation(label, nio.ornt_transform(identity, like.ornt))


def write_label(label: np.ndarray, like: Image, path: Path) -> Path:
    """Write a label map ``[*spatial]`` on `like`'s array grid in the source's storage order, format and
    geometry, atomically.

    The extension of `path` is replaced by `label_suffix(like)`; returns the path written.
    """
    label = np.asarray(label)
    if label.shape != like.spatial_shape:
        raise ValueError(f"label shape {label.shape} != image shape {like.spatial_shape}")
    dtype = np.uint8 if label.min() >= 0 and label.max() < 256 else np.int16 if label.max() < 2**15 else np.int32
    label = np.ascontiguousarray(_to_storage(label.astype(dtype), like))
    path = Path(path)
    out = path.parent / (case_name(path) + label_suffix(like))
    with atomic_path(out) as tmp:
        if like.kind == "2d":
            from PIL import Image as PILImage

            PILImage.fromarray(label).save(tmp, format="PNG")
        elif like.kind == "nifti":
            import nibabel as nib

            header = like.meta["header"].copy()
            header.set_data_dtype(dtype)
            header.set_slope_inter(1, 0)  # the source's intensity scaling must not touch label values
            if len(header.get_data_shape()) != label.ndim:
                header.set_data_shape(label.shape)
            nib.save(nib.Nifti1Image(label, like.meta["affine"], header), str(tmp))
        else:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(np.ascontiguousarray(label.T))  # (i, j, k) -> SimpleITK's (k, j, i)
            img.SetSpacing(like.meta["spacing_xyz"])
            img.SetOrigin(like.meta["origin"])
            img.SetDirection(like.meta["direction"])
            sitk.WriteImage(img, str(tmp), useCompression=True)
    return out
