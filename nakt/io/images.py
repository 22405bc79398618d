"""Reading images and masks with their geometry, and writing labels back in the source's format and geometry.

Arrays are channel-first: an image is ``[C, *spatial]`` float32, a mask ``[*spatial]`` integer. The spatial
axes are the file's own array order (NIfTI: i, j, k; SimpleITK formats: z, y, x; 2D: rows, columns), so a
label written with the geometry of its image overlays it in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nakt.errors import NaktError

__all__ = [
    "IMAGE_SUFFIXES",
    "Image",
    "atomic_path",
    "case_name",
    "is_image_file",
    "label_suffix",
    "read_image",
    "read_mask",
    "write_label",
]

SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
SUFFIXES_NIFTI = (".nii.gz", ".nii")
SUFFIXES_SITK = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
IMAGE_SUFFIXES = SUFFIXES_NIFTI + SUFFIXES_SITK + SUFFIXES_2D


@dataclass
class Image:
    """An image as a channel-first array plus what is needed to write a label on its grid.

    `kind` is ``"2d"``, ``"nifti"`` or ``"sitk"``; `spacing` is per spatial axis in array order (mm, or 1 for
    2D files); `meta` holds the writer's geometry (NIfTI affine and header, SimpleITK origin/direction).
    """

    array: np.ndarray
    path: Path
    kind: str
    spacing: tuple[float, ...]
    meta: dict = field(default_factory=dict)

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


def _read_2d(path: Path, palette_indices: bool = False) -> tuple[np.ndarray, Image]:
    """A 2D file as ``[C, H, W]``; palette images as colours, or as their indices with `palette_indices` (the
    labels of a palette label map, which the palette only colours)."""
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
    return arr, Image(arr, path, "2d", (1.0, 1.0))


def _read_nifti(path: Path) -> tuple[np.ndarray, Image]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as exc:
        raise NaktError(path, f"cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if arr.ndim == 4:  # i, j, k, channel
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim in (2, 3):
        arr = arr[None]
    else:
        raise NaktError(path, f"expected a 2D, 3D or 4D NIfTI, got {arr.ndim} dimensions")
    meta = {"affine": img.affine, "header": img.header}
    return arr, Image(arr, path, "nifti", spacing[: arr.ndim - 1], meta)


def _read_sitk(path: Path) -> tuple[np.ndarray, Image]:
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
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
    meta = {"origin": img.GetOrigin(), "direction": img.GetDirection(), "spacing_xyz": img.GetSpacing()}
    return arr, Image(arr, path, "sitk", spacing, meta)


def _read_one(path: Path, palette_indices: bool = False) -> Image:
    if not path.exists():
        raise NaktError(path, "no such file or folder")
    s = _suffix(path)
    if _is_dicom_folder(path) or s in SUFFIXES_SITK:
        _, image = _read_sitk(path)
    elif s in SUFFIXES_NIFTI:
        _, image = _read_nifti(path)
    elif s in SUFFIXES_2D:
        _, image = _read_2d(path, palette_indices)
    else:
        raise NaktError(path, f"unsupported image format {s!r}", f"supported: {', '.join(IMAGE_SUFFIXES)}")
    if not np.issubdtype(image.array.dtype, np.number) or image.array.dtype == np.bool_:
        image.array = image.array.astype(np.uint8)
    image.array = image.array.astype(np.float32, copy=False)
    if not np.isfinite(image.array).all():
        raise NaktError(path, "image holds NaN or infinite values")
    return image


def read_image(paths: Path | list[Path]) -> Image:
    """Read one image file, a DICOM series folder, or several modality files stacked as channels.

    Returns an `Image` whose array is ``[C, *spatial]`` float32; with several files, their channels are
    concatenated in the given order and the geometry is the first file's.
    """
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    images = [_read_one(p) for p in paths]
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
    palette indices).

    With `like`, the mask must have the image's spatial size; colour masks keep their first channel.
    """
    path = Path(path)
    image = _read_one(path, palette_indices=True)
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


class atomic_path:
    """Context manager yielding a temporary path beside `path`, moved onto it only if the block succeeds."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=self.path.name, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_label(label: np.ndarray, like: Image, path: Path) -> Path:
    """Write a label map ``[*spatial]`` with the geometry of `like`, atomically.

    The extension of `path` is replaced by `label_suffix(like)`; returns the path written.
    """
    label = np.asarray(label)
    if label.shape != like.spatial_shape:
        raise ValueError(f"label shape {label.shape} != image shape {like.spatial_shape}")
    dtype = np.uint8 if label.min() >= 0 and label.max() < 256 else np.int16 if label.max() < 2**15 else np.int32
    label = label.astype(dtype)
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

            img = sitk.GetImageFromArray(label)
            img.SetSpacing(like.meta["spacing_xyz"])
            img.SetOrigin(like.meta["origin"])
            img.SetDirection(like.meta["direction"])
            sitk.WriteImage(img, str(tmp), useCompression=True)
    return out
