import numpy as np
import pytest
import torch

from nakt.models import load
from nakt.preprocess import one_hot
from nakt.train.augment import Augmentation
from nakt.train.data import TrainingSamples
from nakt.train.losses import SoftDiceCELoss


def batch_of(cases: list[dict], classes: int, patch=None, seeds=range(100), **augment) -> dict[str, torch.Tensor]:
    """One batch of `TrainingSamples` over prepared cases, the way the engine's DataLoader stacks them."""
    dims = cases[0]["image"].ndim - 1
    augmentation = Augmentation(dims, ("target",), **{"flip": False, "intensity": False, **augment})
    samples = TrainingSamples(cases, classes, augmentation, patch)
    return torch.utils.data.default_collate([samples[(i, seed)] for i, seed in zip(range(len(cases)), seeds)])


def test_soft_dice_ce_equals_monai_dicece_on_one_hot():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = one_hot(torch.randint(0, 3, (2, 8, 8)), 3)
    ours = SoftDiceCELoss()(logits, target)
    monai = DiceCELoss(softmax=True)(logits, target)
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_batch_dice_sums_over_the_batch_and_spares_a_class_absent_from_one_image():
    """--batch-dice equals MONAI's DiceCELoss(batch=True) on one-hot targets. Two images, a small class-2 blob in
    the first only, predicted perfectly except that the second image gives class 2 a probability of 0.02
    everywhere: per image that costs about a sixth of the loss (class 2's Dice there is 0: a push never to
    predict the class), over the batch almost nothing."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = one_hot(torch.randint(0, 3, (2, 8, 8)), 3)
    ours = SoftDiceCELoss(batch_dice=True)(logits, target)
    assert ours.item() == pytest.approx(DiceCELoss(softmax=True, batch=True)(logits, target).item(), rel=1e-5)

    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, :4] = 1
    labels[0, 5:8, 5:8] = 2
    target = one_hot(labels, 3)
    perfect = 30 * target  # the other classes at ~1e-13
    probs = perfect.softmax(1)
    probs[1] *= 0.98  # image 1: class 2 at 0.02, the others share the rest
    probs[1, 2] = 0.02
    near_miss = probs.log()
    per_image, batch = SoftDiceCELoss(), SoftDiceCELoss(batch_dice=True)
    assert per_image(near_miss, target) - per_image(perfect, target) > 0.15
    assert batch(near_miss, target) - batch(perfect, target) < 0.05


def test_soft_targets_pull_towards_teacher_probabilities():
    """With a soft target of 0.7, logits that predict 0.7 beat logits that predict the hard label."""
    target = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    loss = SoftDiceCELoss(dice_weight=0.0)
    calibrated = torch.log(target)
    confident = torch.log(torch.tensor([0.01, 0.99]).view(1, 2, 1, 1).expand(1, 2, 4, 4))
    assert loss(calibrated, target) < loss(confident, target)


def test_soft_label_training_steps_reach_the_soft_target():
    """20 Adam steps on SoftDiceCE take the network's probabilities to the soft target: the square found, and
    held at about its 0.8, not hardened to 1 (any loss goes down under Adam; this one must go to the target)."""
    torch.manual_seed(0)
    model = load("monai:UNet", in_channels=1, classes=2)
    image = torch.randn(1, 32, 32)
    probs = torch.zeros(2, 32, 32)
    probs[1, 8:24, 8:24] = 0.8
    probs[0] = 1 - probs[1]
    batch = batch_of([{"image": image, "target": probs.half()},
                      {"image": image.flip(-1), "target": probs.flip(-1).half()}], 2, flip=True, intensity=True)
    x, y = batch["image"], batch["target"]
    assert y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(2, 32, 32))
    assert y[:, 1].max() == pytest.approx(0.8, abs=1e-3)  # soft targets stay soft
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = SoftDiceCELoss()
    model.train()

    def foreground() -> torch.Tensor:
        with torch.no_grad():
            return model(x).softmax(1)[:, 1]

    square = y[:, 1] > 0.5
    error = (foreground() - y[:, 1]).abs().mean()  # 0.44 untrained
    for _ in range(20):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    p = foreground()
    assert (p - y[:, 1]).abs().mean() < min(0.1, error / 4)  # 0.05 here
    found = p > 0.5
    assert 2 * (found & square).sum() / (found.sum() + square.sum()) > 0.95  # the square, and nothing else
    assert p[square].mean() == pytest.approx(0.8, abs=0.07)  # 0.78 here: soft, where hard targets give ~1


def test_patch_batches_have_patch_size_and_pad_small_images():
    target = torch.zeros(20, 12, dtype=torch.uint8)
    target[5:8, 3:6] = 1
    case = {"image": torch.randn(2, 20, 12), "target": target}
    batch = batch_of([case, case], 2, patch=(16, 16))
    x, y = batch["image"], batch["target"]
    assert x.shape == (2, 2, 16, 16) and y.shape == (2, 2, 16, 16)
    torch.testing.assert_close(y.sum(1), torch.ones(2, 16, 16))


def test_masked_loss_ignores_disputed_pixels():
    torch.manual_seed(0)
    target = one_hot(torch.randint(0, 2, (1, 8, 8)), 2)
    target[..., :4] = 0.5  # disputed left half
    logits = torch.randn(1, 2, 8, 8)
    mask = (target.amax(1, keepdim=True) >= 0.8).float()
    loss = SoftDiceCELoss()
    other = logits.clone()
    other[..., :4] = torch.randn(1, 2, 8, 4) * 5  # changing only disputed pixels does not change the loss
    assert loss(logits, target, mask).item() == pytest.approx(loss(other, target, mask).item(), rel=1e-6)
    assert loss(logits, target).item() != pytest.approx(loss(other, target).item(), rel=1e-3)
    full = torch.ones_like(mask)  # an all-ones mask equals no mask
    assert loss(logits, target, full).item() == pytest.approx(loss(logits, target).item(), rel=1e-5)


def test_targeted_recipe_and_init_on_segmentation(synthetic2d, tmp_path):
    """`--recipe targeted` unfreezes smp's layer groups from the head down; `--init` starts from another run."""
    import json

    import nakt
    from nakt.classify.transfer import layer_groups
    from nakt.models.weights import read_state_dict

    s = synthetic2d / "splits.json"
    common = dict(images=str(synthetic2d / "images"), masks=str(synthetic2d / "masks"), size=[64], batch_size=4,
                  val_fraction=0, progress=False)
    source = nakt.train(model="smp:Unet/resnet18", cases=f"{s}:teacher_val", out=str(tmp_path / "source"),
                        epochs=1, **common)
    run = nakt.train(model="smp:Unet/resnet18", cases=f"{s}:teacher_train", out=str(tmp_path / "targeted"),
                     epochs=3, recipe="targeted", unfreeze_every=1, init=str(source),
                     **common)
    history = json.loads((run / "metrics.json").read_text())["history"]
    flags = [h["unfrozen_groups"] for h in history]
    assert [sum(f) for f in flags] == [1, 2, 3] and all(f[-1] for f in flags)

    # three epochs unfreeze three groups from the head; the first (the stem) stays frozen with --init's weights
    model = load(str(run))
    groups = layer_groups(model)
    assert len(groups) == len(flags[0]) and not flags[-1][0]
    before, after = read_state_dict(source / "model.safetensors"), model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in groups[0] if n in before)
    assert not all(torch.equal(before[n], after[n]) for n in groups[-1])

    with pytest.raises(nakt.NaktError, match="recipe"):
        nakt.train(model="monai:UNet", out=str(tmp_path / "x"), recipe="targetted", epochs=1, **common)


@pytest.mark.parametrize("shape", [(40, 40), (20, 20, 12)])
def test_spatial_augmentation_moves_image_and_target_together(shape):
    """Rotated/scaled targets stay probabilities and stay on the image's foreground, in 2D and 3D."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    square = torch.as_tensor(np.all([np.abs(g - 0.2) < 0.4 for g in grid], axis=0))
    case = {"image": square[None].float(), "target": square.to(torch.uint8)}
    moved = 0
    for seed in range(2):
        batch = batch_of([case] * 8, 2, seeds=range(8 * seed, 8 * seed + 8), spatial=True)
        x, y = batch["image"], batch["target"]
        assert torch.allclose(y.sum(1), torch.ones(()), atol=1e-5)
        agree = ((x[:, 0] > 0.5) == (y[:, 1] > 0.5)).float().mean()
        assert agree > 0.98
        moved += int((y.argmax(1) != square).any(dim=tuple(range(1, len(shape) + 1))).sum())
    assert moved >= 1  # about half the samples are transformed
