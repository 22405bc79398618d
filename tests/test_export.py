"""`nakt export`: ONNX and TorchScript files that reproduce their run, and the ``onnx:`` teacher scheme."""

import copy
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import write_volume_case

import nakt
from nakt.errors import NaktError
from nakt.export import ExportOptions, export
from nakt.inference import infer_probs
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image
from nakt.models import load

pytest.importorskip("onnxruntime")


TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def _train(**kw):
    return nakt.train(epochs=1, val_fraction=0, progress=False, device="cpu", batch_size=4, **kw)


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory):
    """(data folder, run) for a tiny 2D monai UNet run on 14 generated 48x48 PNGs (masks 0/255)."""
    from nakt.demo import make_synthetic_dataset

    root = tmp_path_factory.mktemp("export2d")
    data = make_synthetic_dataset(root / "data", size=48, seed=1,
                                  splits={"teacher_train": 8, "teacher_val": 2, "transferal": 2, "test": 2})
    run = _train(model="monai:UNet", images=str(data / "images"), masks=str(data / "masks"),
                 out=str(root / "run"), size=[32], model_kwargs=TINY_UNET)
    return data, run


def _max_diff(a, b, images, limit=3) -> float:
    """Max abs difference of `infer_probs` of models a and b on the first `limit` cases of `images`."""
    diffs = []
    for case in discover_cases(images)[:limit]:
        image = read_image(case.images, orientation=a.card.orientation).array
        diffs.append(np.abs(infer_probs(a, image) - infer_probs(b, image)).max())
    return float(max(diffs))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_run_and_loads_without_flags(seg2d, tmp_path, fmt):
    data, run = seg2d
    out = export(ExportOptions(model=str(run), format=fmt, out=str(tmp_path / f"teacher.{fmt}"),
                               images=str(data / "images")))
    side = json.loads((tmp_path / f"teacher.{fmt}.json").read_text())
    assert side["format"] == "nakt.export/1" and side["output"] == "logits" and side["label_values"] == [0, 255]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"teacher.{fmt}", f"teacher.{fmt}.json"]  # no temp

    teacher, native = load(f"{fmt}:{out}"), load(run)
    assert teacher.card.size == [32] and teacher.card.size_divisor == native.card.size_divisor
    assert _max_diff(native, teacher, data / "images") <= 1e-4
    batch = torch.randn(3, 1, 32, 48)  # another batch size and grid than traced: the axes are dynamic
    torch.testing.assert_close(teacher.predict_proba(batch), native.predict_proba(batch), atol=1e-4, rtol=0)

    # an export of nakt's is replaced only on request
    with pytest.raises(NaktError, match="holds a nakt export already"):
        export(ExportOptions(model=str(run), format=fmt, out=str(out)))
    assert export(ExportOptions(model=str(run), format=fmt, out=str(out), overwrite=True)) == out


def test_label_with_an_onnx_teacher_writes_the_runs_masks(seg2d, tmp_path):
    data, run = seg2d
    out = export(ExportOptions(model=str(run), format="onnx", out=str(tmp_path / "t.onnx")))
    for name, teacher in (("native", str(run)), ("onnx", f"onnx:{out}")):
        nakt.label(teacher=[teacher], images=str(data / "images"), out=str(tmp_path / name), device="cpu",
                   precision="fp32", progress=False)  # ONNX Runtime computes in fp32 whatever autocast says
    masks = sorted((tmp_path / "native" / "masks").iterdir())
    assert len(masks) == 14
    for mask in masks:
        a, b = read_image(mask).array, read_image(tmp_path / "onnx" / "masks" / mask.name).array
        assert (a != b).mean() < 1e-3, mask.name  # argmax may flip only where two classes tie to ~1e-6


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_smp_unet_resnet18_exports(tmp_path, fmt):
    """The most common teacher architecture, untrained (exporting does not care): no training, a run written
    directly."""
    from nakt.io import rundir
    from nakt.models import ModelCard, build_model

    card = ModelCard("smp:Unet/resnet18", in_channels=3, classes=3, size=[64], label_values=[0, 1, 4])
    rundir.write_config(tmp_path / "run", card, {"epochs": 0})
    rundir.write_weights(tmp_path / "run", build_model(card).eval())
    out = export(ExportOptions(model=str(tmp_path / "run"), format=fmt, out=str(tmp_path / "smp.bin")))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(load(f"{fmt}:{out}").predict_proba(x), load(tmp_path / "run").predict_proba(x),
                               atol=1e-4, rtol=0)


def test_3d_patch_run_exports_the_bare_net_and_slides_windows(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        case = write_volume_case(tmp_path / "images", f"c{i}", rng, shape=(28, 24, 20))
        (tmp_path / "masks").mkdir(exist_ok=True)
        shutil.move(case / "seg.nii.gz", tmp_path / "masks" / f"c{i}.nii.gz")
    run = _train(model="monai:UNet", images=str(tmp_path / "images"), masks=str(tmp_path / "masks"),
                 out=str(tmp_path / "run"), patch=[24], patches_per_case=1,
                 model_kwargs=TINY_UNET)
    out = export(ExportOptions(model=str(run), format="onnx", out=str(tmp_path / "unet3d.onnx"),
                               images=str(tmp_path / "images")))
    teacher, native = load(f"onnx:{out}"), load(run)
    assert teacher.card.patch == [24] and teacher.card.spatial_dims == 3
    assert _max_diff(native, teacher, tmp_path / "images") <= 1e-4


def test_classification_run_exports_and_loads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, level in (("calm", 60), ("busy", 160)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(rng.normal(level, 40, (36, 36)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    run = _train(model="timm:resnet10t", images=str(tmp_path / "images"), out=str(tmp_path / "run"),
                 task="classification", size=[32])
    out = export(ExportOptions(model=str(run), format="onnx", out=str(tmp_path / "cls.onnx"),
                               images=str(tmp_path / "images")))
    teacher, native = load(f"onnx:{out}"), load(run)
    assert teacher.card.task == "classification" and teacher.card.class_names == native.card.class_names
    x = torch.randn(5, native.card.in_channels, 32, 32)
    probs = teacher.predict_proba(x)
    assert probs.shape == (5, 2)
    torch.testing.assert_close(probs, native.predict_proba(x), atol=1e-4, rtol=0)


def test_export_never_overwrites_a_foreign_file(seg2d, tmp_path):
    _, run = seg2d
    foreign = tmp_path / "model.onnx"
    foreign.write_bytes(b"someone else's model")
    for overwrite in (False, True):
        with pytest.raises(NaktError, match="is not a nakt export"):
            export(ExportOptions(model=str(run), format="onnx", out=str(foreign), overwrite=overwrite))
    (tmp_path / "model.onnx.json").write_text(json.dumps({"in_channels": 1, "classes": 2}))  # a hand-written one
    with pytest.raises(NaktError, match="is not a nakt export"):
        export(ExportOptions(model=str(run), format="onnx", out=str(foreign), overwrite=True))
    assert foreign.read_bytes() == b"someone else's model"


def test_an_export_that_does_not_reproduce_the_run_is_not_written(seg2d, tmp_path, monkeypatch):
    import importlib

    export_module = importlib.import_module("nakt.export")  # `nakt.export` the attribute is the API function

    _, run = seg2d
    write = export_module._WRITERS["onnx"]

    def write_perturbed(net, x, path, opset, source):  # a "faithless exporter": weights drift on the way
        net = copy.deepcopy(net)  # the run's own net stays as it is
        with torch.no_grad():
            next(net.parameters()).add_(0.5)
        write(net, x, path, opset, source)

    monkeypatch.setitem(export_module._WRITERS, "onnx", write_perturbed)
    with pytest.raises(NaktError, match="differs from the run"):
        export(ExportOptions(model=str(run), format="onnx", out=str(tmp_path / "bad.onnx")))
    assert list(tmp_path.iterdir()) == []


def test_sidecar_problems_are_one_line(seg2d, tmp_path, monkeypatch):
    _, run = seg2d
    out = export(ExportOptions(model=str(run), format="onnx", out=str(tmp_path / "m.onnx")))
    side = tmp_path / "m.onnx.json"
    contract = json.loads(side.read_text())
    del contract["classes"]
    side.write_text(json.dumps(contract))
    with pytest.raises(NaktError, match="missing key 'classes'") as info:
        load(f"onnx:{out}")
    assert str(side) in str(info.value) and "\n" not in str(info.value)
    assert load(f"onnx:{out}", classes=2).card.classes == 2  # keyword arguments fill the contract
    with pytest.raises(NaktError, match="spatial_dims=3"):
        load(f"onnx:{out}", classes=2, spatial_dims=3)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(NaktError, match=r'needs the onnx extra: pip install "nakt\[onnx\]"'):
        load(f"onnx:{out}")


def test_options_are_checked_before_anything_runs():
    with pytest.raises(NaktError, match="--format: unknown value 'tflite'"):
        ExportOptions(model="runs/x", format="tflite", out="m.tflite")
    with pytest.raises(NaktError, match="--atol"):
        ExportOptions(model="runs/x", format="onnx", out="m.onnx", atol=-1)
    with pytest.raises(NaktError, match="not a run directory"):
        export(ExportOptions(model="monai:UNet", format="onnx", out="m.onnx"))
