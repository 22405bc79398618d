"""``bundle:DIR`` teachers: a tiny MONAI bundle (made with MONAI's init_bundle) run by `monai.bundle run` with a
probability-saving postprocessing gives the same probabilities as nakt's `BundleTeacher` on nakt's grid."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nakt.errors import NaktError
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image
from nakt.teachers import load_teacher

NETWORK = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
           "strides": [2], "num_res_units": 0}
INFERENCE = {
    "imports": ["$import glob", "$import monai", "$import numpy as np"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "dataset_dir": "/unused",
    "output_dir": "$@bundle_root + '/eval'",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.png')))",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device).eval()",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "ScaleIntensityd", "keys": "image"},
        # a resize, so that the probabilities must be inverted onto the image's own (non-square) grid
        {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32]},
    ]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "resample": False, "separate_folder": False, "print_log": False},
    ]},
    # MONAI's SupervisedEvaluator needs pytorch-ignite (not installed here): the same steps as plain expressions
    "initialize": ["$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', weights_only=True))"],
    "run": ["$[@postprocessing({**item, 'pred': monai.data.decollate_batch("
            "@inferer(item['image'][None].to(@device), @network).detach().cpu())[0]}) for item in @dataset]"],
}
# the reference run: the same bundle, saving the (inverted) probabilities as float32 NIfTI, no argmax
PROBS = {"postprocessing": {"_target_": "Compose", "transforms": [
    *INFERENCE["postprocessing"]["transforms"][:2],
    {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "probs",
     "output_ext": ".nii.gz", "output_dtype": "$np.float32", "resample": False, "separate_folder": False,
     "print_log": False},
]}}


def make_bundle(folder: Path) -> Path:
    """A bundle via MONAI's `init_bundle` (weights of a seeded tiny UNet), with our inference config."""
    from monai.bundle import ConfigParser, init_bundle

    torch.manual_seed(0)
    parser = ConfigParser({"network_def": NETWORK})
    network = parser.get_parsed_content("network_def")
    init_bundle(str(folder), network=network)
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    metadata["network_data_format"] = {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32, 32]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "spatial_shape": [32, 32],
                             "channel_def": {"0": "background", "1": "blob"}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    for stale in (folder / "configs").glob("inference.*"):
        stale.unlink()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    (folder / "configs" / "probs.json").write_text(json.dumps(PROBS, indent=1))
    return folder


@pytest.fixture(scope="module")
def bundle_and_images(tmp_path_factory) -> tuple[Path, Path]:
    from PIL import Image as PILImage

    work = tmp_path_factory.mktemp("bundle")
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # 40 rows x 48 columns: a transposed grid would not even have the right shape
        PILImage.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(images / f"img{i}.png")
    return make_bundle(work / "tiny_bundle"), images


def test_bundle_teacher_matches_monai_bundle_run(bundle_and_images, tmp_path):
    bundle, images = bundle_and_images
    configs = [str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "probs.json")]
    out = tmp_path / "reference"
    # MONAI's own command line (it needs `fire`, in nakt's test extra)
    command = [sys.executable, "-m", "monai.bundle", "run", "--run_id", "run", "--config_file", str(configs),
               "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
               "--dataset_dir", str(images), "--output_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import nibabel as nib

    teacher = load_teacher(f"bundle:{bundle}")
    assert teacher.card.label_values == [0, 1] and teacher.card.class_names == ["background", "blob"]
    assert teacher.card.spatial_dims == 2 and teacher.card.in_channels == 1
    cases = discover_cases(images)
    assert len(cases) == 2
    for case in cases:
        image = read_image(case.images)
        probs = teacher.case_probs(case, image)
        assert probs.shape == (2, 40, 48) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        saved = np.asarray(nib.load(str(out / f"{case.name}_probs.nii.gz")).dataobj)  # (x, y, channel)
        reference = np.moveaxis(saved.squeeze(), -1, 0).transpose(0, 2, 1)  # -> [C, rows, columns]
        assert reference.shape == probs.shape
        assert np.abs(probs - reference).max() <= 1e-4


def test_label_override_and_missing_pieces(bundle_and_images, tmp_path):
    import shutil

    bundle, _ = bundle_and_images
    assert load_teacher(f"bundle:{bundle}?labels=0,255").card.label_values == [0, 255]
    with pytest.raises(NaktError, match="unknown option 'label'"):
        load_teacher(f"bundle:{bundle}?label=0,1")
    with pytest.raises(NaktError, match="MONAI bundle folder not found"):
        load_teacher(f"bundle:{tmp_path / 'nope'}")

    def broken(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        change(copy)
        return copy

    no_config = broken("no_config", lambda b: (b / "configs" / "inference.json").unlink())
    with pytest.raises(NaktError, match="no inference config"):
        load_teacher(f"bundle:{no_config}")
    no_weights = broken("no_weights", lambda b: (b / "models" / "model.pt").unlink())
    with pytest.raises(NaktError, match=r"model\.pt: bundle has no weights file"):
        load_teacher(f"bundle:{no_weights}")

    def drop_network(b: Path) -> None:
        config = json.loads((b / "configs" / "inference.json").read_text())
        del config["network_def"]
        (b / "configs" / "inference.json").write_text(json.dumps(config))

    with pytest.raises(NaktError, match="missing key 'network_def'"):
        load_teacher(f"bundle:{broken('no_net', drop_network)}")

    def drop_channels(b: Path) -> None:
        meta = json.loads((b / "configs" / "metadata.json").read_text())
        del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        (b / "configs" / "metadata.json").write_text(json.dumps(meta))

    no_channels = broken("no_channels", drop_channels)
    with pytest.raises(NaktError, match="channel_def.*labels=0,1"):
        load_teacher(f"bundle:{no_channels}")
    assert load_teacher(f"bundle:{no_channels}?labels=0,1").card.class_names == ["0", "1"]


def test_3d_bundle_without_activation_or_invertd(tmp_path):
    """A 3D bundle that reorients to RAS and whose postprocessing is only an argmax: nakt applies softmax and
    inverts the reorientation itself, then maps the (i, j, k) grid onto nakt's own (RAS) array."""
    import nibabel as nib
    from monai.bundle import ConfigParser, init_bundle

    network = {**NETWORK, "spatial_dims": 3}
    torch.manual_seed(1)
    net = ConfigParser({"n": network}).get_parsed_content("n").eval()
    init_bundle(str(tmp_path / "b3d"), network=net)
    config = {"network_def": network, "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"}]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]}}
    for stale in (tmp_path / "b3d" / "configs").glob("inference.*"):
        stale.unlink()
    (tmp_path / "b3d" / "configs" / "inference.json").write_text(json.dumps(config))
    volumes = tmp_path / "vols"
    volumes.mkdir()
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 1.2, 0, -3], [0, 0, 0, 1]])  # permuted, flipped
    data = np.random.default_rng(0).normal(size=(12, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(volumes / "v.nii.gz"))
    teacher = load_teacher(f"bundle:{tmp_path / 'b3d'}?labels=0,1")
    [case] = discover_cases(volumes)
    image = read_image(case.images)  # RAS: what the bundle's network saw after Orientationd
    probs = teacher.case_probs(case, image)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(image.array)[None]), 1)[0].numpy()
    assert probs.shape == expected.shape == (2, *image.spatial_shape) and image.spatial_shape != data.shape
    assert np.abs(probs - expected).max() <= 1e-5
