"""One teacher, one volume in several formats: do the labels agree?

Trains a small 3D teacher (``monai:UNet``) on a volume of ../shared/data/ct_spleen_mri_spine, stores another
volume of the same modality as NIfTI, MHA, NRRD and as a NIfTI copy with permuted and flipped storage axes (the
same physical image), labels all copies with ``nakt label``, reads each written label back in its source's
geometry (reoriented to RAS) and reports the voxel agreement with the NIfTI copy's label. Before nakt read every
3D format in one convention, MHA/NRRD copies were seen transposed (72.6% agreement on a CT in issue 10).

    python benchmarks/axis_consistency.py [--out runs/axis_consistency] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

import nakt
from nakt.io.images import read_image, read_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct_spleen_mri_spine"
PAIRS = {  # (image, mask) relative to DATA
    "ct": ("ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz",
           "ct_scan/derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz"),
    "t2w": ("sub-unf01/anat/sub-unf01_T2w.nii.gz", "derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz"),
}


def _copies(source: Path, folder: Path) -> list[str]:
    """The volume as NIfTI, MHA, NRRD and a permuted/flipped NIfTI; returns the case names."""
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.load(str(source))
    nib.save(img, str(folder / "as_nifti.nii.gz"))
    itk = sitk.ReadImage(str(source))
    sitk.WriteImage(itk, str(folder / "as_mha.mha"))
    sitk.WriteImage(itk, str(folder / "as_nrrd.nrrd"))
    data = np.asarray(img.dataobj)
    # new[a, b, c] = old[n - 1 - b, c, a]: storage axes permuted, one of them reversed
    permuted = np.ascontiguousarray(np.flip(data.transpose(2, 0, 1), axis=1))
    new_to_old = np.array([[0, -1, 0, data.shape[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(permuted, img.affine @ new_to_old), str(folder / "as_permuted.nii.gz"))
    return ["as_nifti", "as_mha", "as_nrrd", "as_permuted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/axis_consistency")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, (image, mask) in PAIRS.items():
        started = time.time()
        train_dir = out / name / "train"
        (train_dir / "images").mkdir(parents=True, exist_ok=True)
        (train_dir / "masks").mkdir(parents=True, exist_ok=True)
        nib.save(nib.load(str(DATA / image)), str(train_dir / "images" / "case.nii.gz"))
        nib.save(nib.load(str(DATA / mask)), str(train_dir / "masks" / "case.nii.gz"))
        teacher = nakt.train(model="monai:UNet", images=str(train_dir / "images"), masks=str(train_dir / "masks"),
                             out=str(out / name / "teacher"), patch=[32], patches_per_case=8, epochs=args.epochs,
                             batch_size=4, lr=3e-3, val_fraction=0, overwrite=True, progress=False)
        cases = _copies(DATA / image, out / name / "copies")
        labels = nakt.label(teacher=[str(teacher)], images=str(out / name / "copies"), out=str(out / name / "labels"),
                            overwrite=True, progress=False)
        manifest = json.loads((labels / "manifest.json").read_text(encoding="utf-8"))
        arrays, images = {}, {}
        for case in cases:
            source = read_image(next((out / name / "copies").glob(f"{case}.*")))
            images[case] = source.array
            arrays[case] = read_mask(labels / manifest["cases"][case]["mask"], like=source)
        same_input = all(np.array_equal(a, images["as_nifti"]) for a in images.values())
        reference = arrays["as_nifti"]
        results[name] = {"shape_ras": list(reference.shape), "foreground_voxels": int((reference > 0).sum()),
                         "identical_network_input": same_input,
                         "agreement_with_nifti": {c: float((a == reference).mean()) for c, a in arrays.items()},
                         "seconds": round(time.time() - started, 1)}
        print(name, json.dumps(results[name]))
    (out / "axis_consistency.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
