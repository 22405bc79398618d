import numpy as np
import pytest
import torch

from nakt.classify.roskd import TeacherSampler, ema_model, flip_labels, overlapping_subsets
from nakt.classify.transfer import apply_unfreezing, discriminative_param_groups, layer_groups
from nakt.models import load


@pytest.mark.parametrize("spec, first, last", [
    ("timm:resnet18", "net.conv1.weight", "net.fc.weight"),
    ("timm:mobilenetv2_100", "net.conv_stem.weight", "net.classifier.weight"),
    ("smp:Unet/resnet18", "net.encoder.conv1.weight", "net.segmentation_head.0.weight"),
])
def test_layer_groups_run_from_stem_to_head(spec, first, last):
    model = load(spec, in_channels=1, classes=2)
    groups = layer_groups(model)
    assert len(groups) >= 4
    assert first in groups[0] and last in groups[-1]
    everything = [n for g in groups for n in g]
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    lrs = [g["lr"] for g in discriminative_param_groups(model, 1e-3)]
    assert lrs[-1] == pytest.approx(1e-3) and all(a < b for a, b in zip(lrs, lrs[1:]))


def test_gradual_unfreezing_goes_from_head_to_stem():
    model = load("timm:resnet18", in_channels=1, classes=2)
    groups = layer_groups(model)
    params = dict(model.named_parameters())
    seen = []
    for epoch in range(1, len(groups) + 2):
        flags = apply_unfreezing(model, epoch)
        seen.append(flags)
        assert all(params[n].requires_grad == f for g, f in zip(groups, flags) for n in g)
    assert seen[0] == [False] * (len(groups) - 1) + [True]
    assert seen[1] == [False] * (len(groups) - 2) + [True, True]
    assert seen[-1] == [True] * len(groups)


def test_roskd_subsets_sampling_ema_and_label_noise():
    subsets = overlapping_subsets(100, 3, 0.6, seed=0)
    assert [len(s) for s in subsets] == [60, 60, 60]
    assert len(set(subsets[0]) & set(subsets[1])) > 0 and not np.array_equal(subsets[0], subsets[1])
    sampler = TeacherSampler(3, "random", seed=1)
    counts = np.bincount([sampler.draw()[0] for _ in range(3000)], minlength=3)
    assert counts.min() > 900
    assert TeacherSampler(3, "mean").draw() == [0, 1, 2]

    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema, plain = ema_model(net, decay=0.9), ema_model(net, decay=0.9, warmup=False)
    for averaged in (ema, plain):
        averaged.update_parameters(net)  # the first update copies the weights
    with torch.no_grad():
        net.weight.fill_(1.0)
    for averaged in (ema, plain):
        averaged.update_parameters(net)
    assert float(plain.module.weight.detach()[0, 0]) == pytest.approx(0.1)
    # warmup: after one update the decay is min(0.9, 2 / 11), so the new weights count for 9/11
    assert float(ema.module.weight.detach()[0, 0]) == pytest.approx(9 / 11)
    for _ in range(200):  # late updates use the full decay: 0.9 ** 200 of the old weight is left
        ema.update_parameters(net)
    assert float(ema.module.weight.detach()[0, 0]) == pytest.approx(1.0)

    labels = np.array([0, 1, 2, 3, 4] * 20)
    noisy = flip_labels(labels, 5, 0.2, seed=0)
    assert (noisy != labels).mean() == pytest.approx(0.2) and noisy.max() < 5
