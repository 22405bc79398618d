import json
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """Path of a ../shared/data set, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def synthetic2d(tmp_path_factory) -> Path:
    """A small generated 2D set (48x48 PNGs) with splits.json."""
    from nakt.demo import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", size=48, seed=1,
                                  splits={"teacher_train": 12, "teacher_val": 4, "transferal": 12, "test": 6})


def write_random_pngs(folder: Path, n: int = 12, shape=(20, 24)) -> Path:
    """`n` random grey PNGs ``<i>.png`` in `folder` and ``labels.csv`` giving them classes 0, 1, 0, ...;
    returns the CSV."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def write_volume_case(folder: Path, name: str, rng, shape=(24, 20, 16), affine=None):
    """A two-modality NIfTI case folder with a mask inside (labels 0, 1, 2), as in brats6."""
    import nibabel as nib

    affine = np.diag([1.5, 1.2, 2.0, 1.0]) if affine is None else affine
    case = folder / name
    case.mkdir(parents=True)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.3, 0.3, 3)
    r = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    mask = np.where(r < 0.3, 2, np.where(r < 0.55, 1, 0)).astype(np.uint8)
    for i, mod in enumerate(["flair", "t1c"]):
        data = (mask * (1 + i) + rng.normal(0, 0.4, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), str(case / f"{mod}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(case / "seg.nii.gz"))
    return case


def splits_of(path: Path) -> dict:
    return json.loads((path / "splits.json").read_text())
