"""Training data from disk: cached, streamed or read by DataLoader workers, a run trains alike; augmentation is
MONAI dictionary transforms seeded per sample."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nakt
from nakt.io import rundir
from nakt.io.dataset import discover_cases
from nakt.models import ModelCard
from nakt.train.augment import Augmentation
from nakt.train.data import DiskCases, cached_cases, prepared_bytes, survey_cases
from nakt.train.loader import plan_epoch


def losses(run: Path) -> list[tuple]:
    return [(h["train_loss"], h["val_score"]) for h in rundir.read_metrics(run)["history"]]


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_cached_streamed_and_worker_read_data_train_alike(synthetic2d, tmp_path, task):
    """The issue's check: the same losses whether prepared images are held in memory, decoded from their files
    every epoch (a cache of 0 GiB), read by two DataLoader processes, or (segmentation) prepared once into the
    run's prepared/ folder and read back from it, which is gone when training ends."""
    split = synthetic2d / "splits.json"
    if task == "segmentation":
        common = dict(model="monai:UNet", masks=str(synthetic2d / "masks"), size=[32], spatial_augment=True)
    else:
        labels = tmp_path / "labels.csv"
        names = json.loads(split.read_text())["teacher_train"]
        labels.write_text("case,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
        common = dict(model="timm:resnet10t", labels=str(labels), size=[32])
    common.update(images=str(synthetic2d / "images"), cases=f"{split}:teacher_train", epochs=2, batch_size=4,
                  precision="fp32", progress=False, device="cpu")
    no_disk = {"disk_cache": False} if task == "segmentation" else {}
    ways = {"cached": dict(num_workers=0, cache_gb=1.0), "streamed": dict(num_workers=0, cache_gb=0.0, **no_disk),
            "workers": dict(num_workers=2, cache_gb=0.0, **no_disk)}
    if task == "segmentation":
        ways.update({"disk": dict(num_workers=0), "disk+workers": dict(num_workers=2)})
    runs = {name: nakt.train(out=str(tmp_path / name), **way, **common) for name, way in ways.items()}
    reference = losses(runs["cached"])
    assert len(reference) == 2 and all(loss is not None for loss, _ in reference)
    for name in ways:
        assert losses(runs[name]) == reference, name
        assert not (runs[name] / "prepared").exists()


def test_cache_holds_the_leading_cases_within_its_budget(synthetic2d, tmp_path):
    card = ModelCard("monai:UNet", 1, 2, label_values=[0, 255], size=[32])
    infos = survey_cases(discover_cases(synthetic2d / "images", synthetic2d / "masks")[:6], progress=False)
    one = prepared_bytes(infos[0], card, soft=False)
    assert one == 32 * 32 * (4 + 1)  # float32 image, uint8 class indices
    dataset, held = cached_cases(infos, card, budget=3 * one + 1, progress=False)
    assert held == 3 * one and dataset.in_memory == 3 and dataset.streamed
    streamed, _ = cached_cases(infos, card, budget=0, progress=False)
    on_disk, _ = cached_cases(infos, card, budget=3 * one + 1, disk=tmp_path / "prepared", progress=False)
    assert streamed.streamed and not on_disk.streamed
    for i in (1, 4):  # a cached, a streamed and a read-back case are the same prepared case
        for key in ("image", "target"):
            assert torch.equal(dataset[i][key], streamed[i][key])
            assert torch.equal(dataset[i][key], on_disk[i][key])
    written = sorted(f.name for f in (tmp_path / "prepared").iterdir())  # prepared up front, beyond the memory
    assert written == sorted(f"{info.case.name}.pt" for info in infos[3:])


def test_each_training_process_prepares_its_share_of_the_disk_cache(synthetic2d, tmp_path):
    """Under torchrun rank r of W writes cases r, r+W, ... (`DiskCases.fill`), so no case is prepared twice;
    after both shares every case reads back."""
    infos = survey_cases(discover_cases(synthetic2d / "images", synthetic2d / "masks")[:5], progress=False)
    prepared = []

    def prepare(info):
        prepared.append(info.case.name)
        return {"image": torch.full((1, 2), float(len(prepared)))}

    cases = DiskCases(infos, prepare, tmp_path / "prepared")
    cases.fill(progress=False, rank=1, world=2)
    assert prepared == [infos[1].case.name, infos[3].case.name]
    cases.fill(progress=False, rank=0, world=2)
    assert sorted(prepared) == sorted(info.case.name for info in infos)
    cases.fill_shared(progress=False)  # no process group: one process, everything already on disk
    assert len(prepared) == 5 and [cases[i]["image"][0, 0].item() for i in (1, 0)] == [1.0, 3.0]


def test_augmentation_depends_on_the_seed_only_and_moves_targets_with_images():
    image = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(2, 6, 8)
    target = torch.stack([image[0] % 8 >= 3, image[0] % 8 < 3]).float()  # not mirror-symmetric
    sample = {"image": image, "target": target}
    augment = Augmentation(2, ("target",), flip=True, intensity=True)
    first, again = augment(sample, 7), Augmentation(2, ("target",))(sample, 7)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["target"], again["target"])
    assert torch.equal(sample["image"], image)  # the input is not modified
    flipped = [augment(sample, seed) for seed in range(20)]
    kinds = {bool(torch.equal(out["target"], target.flip(-1))) for out in flipped}
    assert kinds == {True, False}  # about half are mirrored, and the target always with its image
    for out in flipped:
        same_side = torch.equal(out["target"], target) or torch.equal(out["target"], target.flip(-1))
        assert same_side and type(out["image"]) is torch.Tensor
        base = image.flip(-1) if torch.equal(out["target"], target.flip(-1)) else image
        ratio = (out["image"] - out["image"].mean()) / (base - base.mean())
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-4)  # scaled and shifted only
        assert 0.89 < float(ratio.flatten()[0]) < 1.11


def test_epoch_plan_drops_only_a_batch_too_small_for_batchnorm():
    rng = np.random.default_rng(0)
    plan = plan_epoch(np.arange(9), 4, rng)
    assert [len(b) for b in plan] == [4, 4]  # the lone ninth sample waits for the next epoch
    assert [len(b) for b in plan_epoch(np.arange(10), 4, rng)] == [4, 4, 2]
    assert [len(b) for b in plan_epoch(np.arange(10), 4, rng, world=2)] == [4, 4]  # 1 per rank is too few
    assert [len(b) for b in plan_epoch(np.arange(1), 4, rng)] == [1]  # a single sample still trains
    seeds = [s for b in plan_epoch(np.arange(8), 4, rng) for _, s in b]
    assert len(set(seeds)) == 8


def test_torchrun_two_processes_train_like_one_with_the_same_global_batch(synthetic2d, tmp_path):
    """DDP under torchrun (gloo, 2 CPU processes, 2 images each) against one process with batches of 4: the
    same losses and validation scores within float tolerance (MONAI's UNet normalises per instance, so the
    split batch computes the same function; 12 cases make three whole batches), and rank 0 alone writes the
    run."""
    import subprocess
    import sys

    split = synthetic2d / "splits.json"
    args = ["--model", "monai:UNet", "--images", str(synthetic2d / "images"), "--masks", str(synthetic2d / "masks"),
            "--cases", f"{split}:teacher_train", "--val-images", str(synthetic2d / "images"),
            "--val-cases", f"{split}:teacher_val", "--size", "32", "--epochs", "3", "--batch-size", "4",
            "--precision", "fp32", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for cmd, out in (([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "nakt"], "two"),
                     ([sys.executable, "-m", "nakt"], "one")):
        done = subprocess.run([*cmd, "train", *args, "--out", str(tmp_path / out)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(np.array(two, dtype=float), np.array(one, dtype=float), rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"]["batch_size"] == 4


@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compiled_training_follows_the_eager_one(synthetic2d, tmp_path, capfd, precision, rtol):
    """``--compile`` (torch.compile with Inductor) trains the same model: losses within the precision's
    tolerance, and the compiled graph is kept (BatchNorm's backward rounds differently compiled, well within what
    fp32 allows; under bf16 the eager step is itself far from fp32, and the compiled one no further)."""
    split = synthetic2d / "splits.json"
    small = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "batch"}  # compiles in seconds
    common = dict(model="monai:UNet", model_kwargs=small, images=str(synthetic2d / "images"),
                  masks=str(synthetic2d / "masks"), cases=f"{split}:teacher_train", size=[32], epochs=2, batch_size=4,
                  precision=precision, num_workers=0, progress=False, device="cpu")
    eager = nakt.train(out=str(tmp_path / "eager"), **common)
    compiled = nakt.train(out=str(tmp_path / "compiled"), compile=True, **common)
    assert "disagrees" not in capfd.readouterr().err
    (eager_loss, eager_dice), (compiled_loss, compiled_dice) = (np.array(losses(r), dtype=float).T
                                                                for r in (eager, compiled))
    np.testing.assert_allclose(compiled_loss, eager_loss, rtol=rtol)
    np.testing.assert_allclose(compiled_dice, eager_dice, atol=0.01 if precision == "fp32" else 0.05)


class _Miscompiled(torch.nn.Module):
    """A stand-in for a graph Inductor got wrong: the module's output negated, or right but with gradients
    three times too large."""

    def __init__(self, module: torch.nn.Module, wrong: str):
        super().__init__()
        self.module, self.wrong = module, wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return -out if self.wrong == "output" else out.detach() + 3 * (out - out.detach())


@pytest.mark.parametrize(("wrong", "precision"), [("output", "fp32"), ("gradients", "fp32"), ("gradients", "bf16")])
def test_a_compiled_training_step_that_disagrees_with_eager_is_dropped(synthetic2d, tmp_path, monkeypatch, capfd,
                                                                       wrong, precision):
    """A compiled training graph is trusted only once its first step agrees with the eager one (output, loss and
    gradients): one that does not is dropped with a line, and the run trains exactly as an eager run does."""
    import importlib

    engine = importlib.import_module("nakt.train.engine")
    monkeypatch.setattr(engine, "compile_for_training", lambda module: _Miscompiled(module, wrong))
    split = synthetic2d / "splits.json"
    common = dict(model="monai:UNet", model_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0,
                                                    "norm": "batch"},  # running statistics: moved once a step
                  images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"), cases=f"{split}:teacher_train",
                  size=[32], epochs=2, batch_size=4, precision=precision, num_workers=0, progress=False,
                  device="cpu")
    compiled = nakt.train(out=str(tmp_path / "compiled"), compile=True, **common)
    assert "the compiled training step disagrees with the eager one" in capfd.readouterr().err
    eager = nakt.train(out=str(tmp_path / "eager"), **common)
    assert losses(compiled) == losses(eager)


def test_only_a_prepared_folder_nakt_marked_is_removed(tmp_path):
    """A run's prepared/ goes when training ends only if nakt wrote it; a user's folder of that name stays."""
    user = tmp_path / "user_run"
    (user / "prepared").mkdir(parents=True)
    (user / "prepared" / "mine.txt").write_text("keep")
    rundir.remove_prepared_cases(user)
    assert (user / "prepared" / "mine.txt").read_text() == "keep"
    ours = tmp_path / "run"
    folder = rundir.prepared_cases(ours, "train")
    folder.mkdir(parents=True)
    (folder / "case.pt").write_bytes(b"x")
    rundir.remove_prepared_cases(ours)
    assert not (ours / "prepared").exists()


def test_patches_per_case_without_patch_says_it_is_ignored(synthetic2d, tmp_path, capfd):
    """`patches_per_case` counts `patch` crops: without `patch` each case is one whole image per epoch, so a
    changed value says so in one line rather than train as briefly as before in silence; with crops it counts."""
    split = synthetic2d / "splits.json"
    common = dict(model="monai:UNet", model_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
                  images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"), cases=f"{split}:teacher_train",
                  size=[64], epochs=1, batch_size=4, val_fraction=0, precision="fp32", num_workers=0, progress=False,
                  device="cpu", patches_per_case=3)
    whole = nakt.train(out=str(tmp_path / "whole"), **common)
    assert "--patches-per-case 3 is ignored" in capfd.readouterr().err
    crops = nakt.train(out=str(tmp_path / "crops"), patch=[32], **common)
    assert "ignored" not in capfd.readouterr().err
    cases = len(json.loads(split.read_text())["teacher_train"])
    assert [rundir.read_metrics(r)["history"][0]["samples"] for r in (whole, crops)] == [cases, 3 * cases]
