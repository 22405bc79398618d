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


@pytest.fixture(scope="session")
def unet_teacher(synthetic2d, tmp_path_factory) -> Path:
    """A monai:UNet run trained on `synthetic2d`'s teacher_train split (3 epochs at 32 px, lr 1e-2, no
    validation; a few seconds): test Dice ~0.69, where a constant mask scores ~0.21. Shared by every test that
    needs a teacher that has learnt something: read it, never write into it."""
    return train_small_teacher(synthetic2d, tmp_path_factory.mktemp("unet_teacher") / "run", "monai:UNet")


def train_small_teacher(data: Path, out: Path, spec: str) -> Path:
    """A `spec` network trained as `unet_teacher` is."""
    import nakt

    return nakt.train(model=spec, images=str(data / "images"), masks=str(data / "masks"),
                      cases=f"{data / 'splits.json'}:teacher_train", size=[32], epochs=3, lr=1e-2, out=str(out),
                      val_fraction=0, progress=False, device="cpu")


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


# --- floors a trained network must beat ------------------------------------------------------------------------

def read_label_maps(paths, values) -> list[np.ndarray]:
    """Masks (PNG or NIfTI) as class indices 0..C-1 of `values`, read with PIL / nibabel, not with nakt."""
    from PIL import Image

    maps = []
    for path in paths:
        if str(path).endswith((".nii", ".nii.gz")):
            import nibabel as nib

            mask = np.asarray(nib.load(str(path)).dataobj)
        else:
            mask = np.asarray(Image.open(path))
        assert set(np.unique(mask)) <= set(values), (path, np.unique(mask))
        maps.append(np.searchsorted(np.asarray(values), mask))
    return maps


def dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Foreground Dice of two class-index maps as `nakt evaluate` defines it: the mean over the foreground
    classes present in either map, 1.0 where neither has foreground."""
    scores = [2 * np.sum((pred == c) & (truth == c)) / (np.sum(pred == c) + np.sum(truth == c))
              for c in range(1, classes) if (pred == c).any() or (truth == c).any()]
    return float(np.mean(scores)) if scores else 1.0


def constant_floor(truths: list[np.ndarray], classes: int) -> float:
    """The best mean Dice any constant prediction (every pixel background, or every pixel class c) reaches on
    these class-index maps: a trained network that scores no higher has learnt nothing about the images."""
    return max(float(np.mean([dice(np.full_like(t, c), t, classes) for t in truths])) for c in range(classes))


def untrained_twin(run: Path, out: Path, seed: int = 0) -> Path:
    """A copy of run directory `run` whose weights are a fresh initialisation of the same architecture: the
    baseline a trained (or distilled) network must beat."""
    import shutil

    import torch

    from nakt.io import rundir
    from nakt.models import build_model

    shutil.copytree(run, out)
    torch.manual_seed(seed)
    rundir.write_weights(out, build_model(rundir.read_config(run)[0]))
    return out
