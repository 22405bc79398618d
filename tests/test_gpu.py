"""GPU readiness: everything that runs on ``--device cuda`` (label, predict, evaluate, train, distill; DDP with NCCL
under torchrun; ``nnunet:`` and ``onnx:`` teachers), run on a real GPU and held to the CPU's own results.

Every test is skipped, with its reason, on a machine without a CUDA GPU (no fixture is built then: collecting this
file costs nothing). The CUDA-only branches these paths take are also checked on the CPU, with stand-ins for torch's
CUDA and NCCL calls, in tests/test_cuda_paths.py. On a GPU machine: ``pytest -rs tests/test_gpu.py`` (one GPU for
all but the DDP test, which needs two).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import constant_floor, read_label_maps
from test_nnunet import nnunet_root  # noqa: F401  (fixture: a tiny 2D model planned and trained by nnU-Net)

import nakt
from nakt.cli import main
from nakt.inference import resolve_precision
from nakt.io import labelset, rundir
from nakt.teachers import load_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU on this machine: the --device cuda paths need "
                                       "torch.cuda.is_available()")
GPU = "cuda"
BLOBS = [0, 255]  # the label values of `synthetic2d`'s masks


def cases(data: Path, split: str) -> tuple[str, list[str]]:
    """``--cases`` of one split of `data`'s splits.json, and its case names."""
    return f"{data / 'splits.json'}:{split}", json.loads((data / "splits.json").read_text())[split]


def masks(folder: Path, names: list[str], values=BLOBS) -> list[np.ndarray]:
    return read_label_maps([folder / f"{name}.png" for name in names], values)


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The share of pixels on which two lists of label maps agree."""
    return float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b)])))


def native_gpu_precision() -> str:
    """What ``--precision auto`` is on this GPU: bf16 from Ampere on, fp16 before."""
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def test_label_on_the_gpu_runs_in_reduced_precision_and_agrees_with_fp32_on_the_cpu(synthetic2d, unet_teacher,
                                                                                    tmp_path):
    chosen, names = cases(synthetic2d, "transferal")
    common = dict(teacher=[str(unet_teacher)], images=str(synthetic2d / "images"), cases=chosen, progress=False)
    torch.cuda.reset_peak_memory_stats()
    gpu = nakt.label(out=str(tmp_path / "gpu"), device=GPU, **common)  # precision auto
    assert torch.cuda.max_memory_allocated() > 0  # the teacher ran on the GPU
    cpu = nakt.label(out=str(tmp_path / "cpu"), device="cpu", precision="fp32", **common)
    manifest = labelset.read_manifest(gpu)
    assert manifest["precision"] == native_gpu_precision() == resolve_precision("auto", torch.device(GPU))
    assert sorted(manifest["cases"]) == sorted(names)
    assert agreement(masks(gpu / "masks", names), masks(cpu / "masks", names)) >= 0.99
    for name in names:  # the soft labels too, within reduced-precision rounding
        assert np.abs(labelset.read_probs(gpu, name) - labelset.read_probs(cpu, name)).max() < 0.1


def test_predict_and_evaluate_on_the_gpu_agree_with_the_cpu(synthetic2d, unet_teacher, tmp_path):
    chosen, names = cases(synthetic2d, "test")
    data = ["--model", unet_teacher, "--images", synthetic2d / "images", "--cases", chosen, "--no-progress"]
    arms = {"gpu": (GPU, "auto"), "cpu": ("cpu", "fp32")}  # (device, precision)
    for arm, (device, precision) in arms.items():
        assert main([str(a) for a in ["predict", *data, "--device", device, "--precision", precision,
                                      "--out", tmp_path / f"pred_{arm}"]]) == 0
    assert agreement(masks(tmp_path / "pred_gpu", names), masks(tmp_path / "pred_cpu", names)) >= 0.99
    dice = {arm: nakt.evaluate(model=str(unet_teacher), images=str(synthetic2d / "images"),
                               masks=str(synthetic2d / "masks"), cases=chosen, out=str(tmp_path / f"eval_{arm}"),
                               device=device, precision=precision, progress=False)["mean"]["dice"]
            for arm, (device, precision) in arms.items()}
    assert abs(dice["gpu"] - dice["cpu"]) <= 0.02
    assert dice["gpu"] > constant_floor(masks(synthetic2d / "masks", names), 2)


def score_on_test(run: Path, data: Path, out: Path) -> tuple[float, float]:
    """(the run's mean test Dice, evaluated on the GPU; the best a constant prediction scores there)."""
    chosen, names = cases(data, "test")
    summary = nakt.evaluate(model=str(run), images=str(data / "images"), masks=str(data / "masks"), cases=chosen,
                            out=str(out), device=GPU, progress=False)
    return summary["mean"]["dice"], constant_floor(masks(data / "masks", names), 2)


@pytest.mark.parametrize("precision", ["auto", "fp16"])  # fp16 trains with the gradient scaler
def test_train_on_the_gpu_learns(synthetic2d, tmp_path, precision):
    """A monai:UNet trained as the shared CPU teacher is (conftest: test Dice ~0.69 there, a constant ~0.21)."""
    chosen, _ = cases(synthetic2d, "teacher_train")
    run = nakt.train(model="monai:UNet", images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"),
                     cases=chosen, size=[32], epochs=3, lr=1e-2, out=str(tmp_path / "run"), val_fraction=0,
                     progress=False, device=GPU, precision=precision)
    metrics = rundir.read_metrics(run)
    assert metrics["precision"] == resolve_precision(precision, torch.device(GPU))
    assert len(metrics["history"]) == 3 and all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert next(nakt.load(run).parameters()).device.type == "cpu"  # a GPU-trained run loads anywhere
    score, floor = score_on_test(run, synthetic2d, tmp_path / "eval")
    assert score > floor, (score, floor)


def test_distill_on_the_gpu_learns_from_its_teacher(synthetic2d, unet_teacher, tmp_path):
    """Online distillation: the teacher runs on the GPU on the student's batches; no masks are read."""
    chosen, _ = cases(synthetic2d, "transferal")
    assert main([str(a) for a in ["distill", "--model", "monai:UNet", "--teacher", unet_teacher, "--images",
                                  synthetic2d / "images", "--cases", chosen, "--size", 32, "--epochs", 3, "--lr", 1e-2,
                                  "--val-fraction", 0, "--device", GPU, "--out", tmp_path / "student",
                                  "--no-progress"]]) == 0
    assert rundir.read_metrics(tmp_path / "student")["precision"] == native_gpu_precision()
    score, floor = score_on_test(tmp_path / "student", synthetic2d, tmp_path / "eval")
    assert score > floor, (score, floor)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"DDP with NCCL needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}")
def test_torchrun_on_two_gpus_trains_like_one_with_the_same_global_batch(synthetic2d, tmp_path):
    """tests/test_training_data.py's torchrun test on GPUs: NCCL, one GPU per process, 2 images each, against one
    process with batches of 4. Looser than its gloo twin: cuDNN picks its convolution algorithms (TF32 ones
    included) per batch size."""
    split = synthetic2d / "splits.json"
    args = ["--model", "monai:UNet", "--images", str(synthetic2d / "images"), "--masks", str(synthetic2d / "masks"),
            "--cases", f"{split}:teacher_train", "--val-images", str(synthetic2d / "images"),
            "--val-cases", f"{split}:teacher_val", "--size", "32", "--epochs", "3", "--batch-size", "4",
            "--precision", "fp32", "--device", GPU, "--num-workers", "0", "--no-progress"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd, out in (([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "nakt"], "two"),
                     ([sys.executable, "-m", "nakt"], "one")):
        done = subprocess.run([*cmd, "train", *args, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = ([(h["train_loss"], h["val_score"]) for h in rundir.read_metrics(tmp_path / run)["history"]]
                for run in ("one", "two"))
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(np.array(two)[:, 0], np.array(one)[:, 0], rtol=2e-2)
    np.testing.assert_allclose(np.array(two)[:, 1], np.array(one)[:, 1], atol=0.03)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["batch_size"] == 4


def test_nnunet_teacher_on_the_gpu_labels_as_on_the_cpu(nnunet_root, tmp_path):  # noqa: F811
    """An ``nnunet:`` teacher on the GPU: nnU-Net's predictor keeps the whole case there (and runs under its own
    autocast), and labels as the same teacher does on the CPU (which tests/test_nnunet.py holds to
    ``nnUNetv2_predict``)."""
    folder = nnunet_root / "res" / "Dataset901_Tiny" / "nnUNetTrainer__nnUNetPlans__2d"
    spec = f"nnunet:{folder}"
    teacher = load_teacher(spec, GPU)
    assert teacher.predictor.device.type == "cuda" and teacher.predictor.perform_everything_on_device
    images = tmp_path / "images"
    images.mkdir()
    for image in sorted((nnunet_root / "raw" / "Dataset901_Tiny" / "imagesTr").glob("*_0000.png")):
        shutil.copy(image, images / image.name.replace("_0000", ""))
    names = sorted(p.stem for p in images.iterdir())
    labels = {arm: nakt.label(teacher=[spec], images=str(images), out=str(tmp_path / arm), device=device,
                              progress=False) for arm, device in (("gpu", GPU), ("cpu", "cpu"))}
    for name in names:  # a model trained for two iterations: near-ties abound, so the probabilities are compared
        assert np.abs(labelset.read_probs(labels["gpu"], name) - labelset.read_probs(labels["cpu"], name)).max() < 0.05
    assert agreement(masks(labels["gpu"] / "masks", names, [0, 1, 2]),
                     masks(labels["cpu"] / "masks", names, [0, 1, 2])) >= 0.98


def test_onnx_teacher_on_the_gpu_runs_on_onnxruntimes_cuda_provider(synthetic2d, unet_teacher, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider here (providers: "
                    f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)")
    exported = nakt.export(model=str(unet_teacher), format="onnx", out=str(tmp_path / "teacher.onnx"))
    teacher = load_teacher(f"onnx:{exported}", GPU)
    assert teacher.model.net._session(torch.device(GPU)).get_providers()[0] == "CUDAExecutionProvider"
    chosen, names = cases(synthetic2d, "transferal")
    common = dict(images=str(synthetic2d / "images"), cases=chosen, progress=False)
    gpu = nakt.label(teacher=[f"onnx:{exported}"], out=str(tmp_path / "onnx_gpu"), device=GPU, **common)
    cpu = nakt.label(teacher=[str(unet_teacher)], out=str(tmp_path / "native_cpu"), device="cpu", precision="fp32",
                     **common)
    assert agreement(masks(gpu / "masks", names), masks(cpu / "masks", names)) >= 0.99
