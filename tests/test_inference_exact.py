"""Inference graph tricks that must not change results: BatchNorm folded into convolutions (`nakt.fold`)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import nakt
from nakt.fold import batchnorm_pairs, fold_batchnorm
from nakt.models import ModelCard, NaktModel, build_model

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# spec, card extras, input shape, BatchNorms in the net, BatchNorms folded
CASES = [
    # resnet18 encoder: stem 1 + 8 blocks x 2 + 3 downsamples = 20; the decoder's Conv2dReLUs 10 more
    ("smp:Unet/resnet18", {}, (2, 3, 64, 64), 30, 30),
    # the one left is ASPP's pooling branch: its Sequential rewrites forward (it upsamples at the end)
    ("smp:DeepLabV3Plus/mobilenet_v2", {}, (2, 3, 64, 64), 61, 60),
    ("smp:FPN/resnet34", {}, (2, 3, 64, 64), 36, 36),
    ("monai:UNet", {}, (2, 1, 48, 40), 0, 0),  # instance norm: nothing to fold
    ("monai:UNet", {"model_kwargs": {"norm": "batch"}}, (2, 1, 48, 40), 17, 17),  # Convolution: conv -> ADN(N..)
    ("monai:UNet", {"spatial_dims": 3, "model_kwargs": {"norm": "batch", "channels": [4, 8, 16], "strides": [2, 2]}},
     (1, 1, 16, 16, 16), 9, 9),
    ("monai:SegResNet", {}, (2, 1, 32, 32), 0, 0),  # group norm
    ("timm:resnet10t", {"task": "classification"}, (2, 3, 64, 64), 14, 14),  # deep stem: conv1 is a Sequential
]


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from a fresh BatchNorm's identity (mean 0, var 1, gamma 1, beta 0),
    so that a fold that drops any of them shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, BATCHNORMS)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)


def built(spec: str, extra: dict) -> NaktModel:
    torch.manual_seed(0)
    in_channels = 3 if spec.startswith(("smp:", "timm:")) else 1
    model = build_model(ModelCard(spec=spec, in_channels=in_channels, classes=3, **extra)).eval()
    randomize_batchnorms(model)
    return model


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, BATCHNORMS) for m in model.modules())


IDS = ["smp-unet-resnet18", "smp-deeplabv3plus-mobilenet_v2", "smp-fpn-resnet34", "monai-unet", "monai-unet-bn",
       "monai-unet-bn-3d", "monai-segresnet", "timm-resnet10t"]


@pytest.mark.parametrize("spec, extra, shape, present, expected", CASES, ids=IDS)
def test_folded_batchnorms_give_the_same_probabilities(spec, extra, shape, present, expected):
    model = built(spec, extra)
    assert count_batchnorms(model) == present
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before_logits, before = model(x), model.predict_proba(x)
    folded = fold_batchnorm(model)
    assert folded == expected and count_batchnorms(model) == present - expected
    with torch.inference_mode():
        after_logits, after = model(x), model.predict_proba(x)
    assert (after - before).abs().max() <= 1e-5
    # logits too: saturated softmaxes could hide a wrong fold
    scale = before_logits.abs().max().clamp_min(1.0)
    assert (after_logits - before_logits).abs().max() / scale <= 1e-5


@pytest.mark.parametrize("spec, extra, shape", [c[:3] for c in CASES if c[4]], ids=[i for i, c in zip(IDS, CASES)
                                                                                    if c[4]])
def test_each_folded_batchnorm_reads_exactly_its_convs_output(spec, extra, shape):
    """Run the unfolded net with hooks: every pair found must be a conv whose output tensor itself is the
    BatchNorm's input, so the fold cannot have skipped anything between them."""
    model = built(spec, extra)
    pairs = batchnorm_pairs(model)
    outputs, checked = {}, []
    handles = []
    for k, (conv, bn) in enumerate(pairs):
        handles.append(conv.register_forward_hook(lambda m, i, o, key=k: outputs.__setitem__(key, o)))
        handles.append(bn.register_forward_pre_hook(lambda m, i, key=k: checked.append(i[0] is outputs.get(key))))
    with torch.inference_mode():
        model(torch.randn(*shape))
    for handle in handles:
        handle.remove()
    assert len(checked) == len(pairs) and all(checked)


def test_what_is_never_folded():
    def block():
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()

    assert fold_batchnorm(block().train()) == 0  # training mode: the statistics are the batch's own

    class Rewired(nn.Sequential):  # a Sequential with its own forward: the data flow is not the order
        def forward(self, x):
            return self[1](self[0](x) + 1)

    assert fold_batchnorm(Rewired(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()) == 0
    no_stats = block()
    no_stats[1] = nn.BatchNorm2d(4, track_running_stats=False).eval()
    assert fold_batchnorm(no_stats) == 0
    hooked = block()
    hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    assert fold_batchnorm(hooked) == 0
    shared = block()
    twice = nn.Sequential(shared, nn.Sequential(shared[0], nn.ReLU())).eval()  # the conv is used twice
    assert fold_batchnorm(twice) == 0
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()) == 0


def test_transposed_and_1d_convolutions_fold_exactly():
    net = nn.Sequential(nn.ConvTranspose2d(2, 4, 2, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 3, 3, bias=False)), nn.Sequential(nn.BatchNorm2d(3))).eval()
    line = nn.Sequential(nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5)).eval()
    for model, x in ((net, torch.randn(2, 2, 8, 8)), (line, torch.randn(3, 2, 20))):
        randomize_batchnorms(model)
        with torch.inference_mode():
            before = model(x)
            assert fold_batchnorm(model) == (2 if model is net else 1)
            assert (model(x) - before).abs().max() <= 1e-5


def test_teachers_fold_and_predictions_record_it(tmp_path):
    """A run loaded as a teacher (label, predict, evaluate) is folded; its probabilities are those of the
    unfolded model, and predictions.json records how many BatchNorms were folded."""
    from nakt.inference import infer_probs
    from nakt.io import rundir
    from nakt.teachers import load_teacher

    model = built("smp:Unet/resnet18", {"size": [32]})
    run = tmp_path / "run"
    rundir.write_config(run, model.card, {})
    rundir.write_weights(run, model)
    teacher = load_teacher(str(run), fold=True)
    assert teacher.batchnorm_folded == 30 and count_batchnorms(teacher.model) == 0
    assert load_teacher(str(run)).batchnorm_folded == 0  # folding is asked for: exact in fp32 only
    image = np.random.default_rng(0).random((3, 40, 36)).astype(np.float32)
    np.testing.assert_allclose(infer_probs(teacher.model, image), infer_probs(model, image), atol=1e-5, rtol=0)

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image as PILImage

    PILImage.fromarray((image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(images / "a.png")  # RGB, rows x cols
    out = nakt.predict(model=str(run), images=str(images), out=str(tmp_path / "pred"), device="cpu",
                       precision="fp32", progress=False)
    assert json.loads((out / "predictions.json").read_text())["batchnorm_folded"] == 30
    # under bf16 the folded weights would round differently: the network runs as trained
    bf16 = nakt.predict(model=str(run), images=str(images), out=str(tmp_path / "pred_bf16"), device="cpu",
                        precision="bf16", progress=False)
    assert json.loads((bf16 / "predictions.json").read_text())["batchnorm_folded"] == 0
