import json

import numpy as np
import pytest
import torch
import yaml

import nakt
from nakt.config import make_options
from nakt.errors import NaktError
from nakt.inference import infer_probs
from nakt.models import load
from nakt.train import TrainOptions


@pytest.mark.parametrize("spec", ["smp:Unet/resnet18", "smp:UnetPlusPlus/resnet18", "smp:DeepLabV3Plus/mobilenet_v2",
                                  "smp:FPN/mobilenet_v2", "smp:Linknet/resnet18", "smp:MAnet/resnet18",
                                  "smp:PSPNet/resnet18", "smp:DeepLabV3/resnet18", "monai:UNet", "monai:BasicUNet",
                                  "monai:SegResNet", "monai:AttentionUnet"])
def test_every_spec_maps_any_size_to_logits(spec):
    model = load(spec, in_channels=3, classes=4)
    assert model(torch.zeros(2, 3, 45, 70)).shape == (2, 4, 45, 70)


@pytest.mark.parametrize("spec", ["monai:UNet", "monai:SegResNet", "monai:BasicUNet"])
def test_3d_monai_nets(spec):
    model = load(spec, in_channels=2, classes=3, spatial_dims=3)
    assert model(torch.zeros(1, 2, 20, 18, 17)).shape == (1, 3, 20, 18, 17)


@pytest.mark.parametrize("spec, message", [("smp:Unet/resnet1800", "unknown smp encoder 'resnet1800'"),
                                           ("monai:Unet", "did you mean 'UNet'"),
                                           ("tf:model", "unknown model scheme 'tf'"),
                                           ("UNet", "unknown model spec 'UNet'")])
def test_unknown_specs_list_the_options(spec, message):
    with pytest.raises(NaktError, match=message):
        load(spec, in_channels=1, classes=2)


def test_torchscript_teacher_with_sidecar_contract(tmp_path):
    model = load("monai:UNet", in_channels=1, classes=2)
    scripted = torch.jit.trace(model.net.eval(), torch.zeros(1, 1, 32, 32))
    scripted.save(str(tmp_path / "foreign.pt"))
    (tmp_path / "foreign.pt.json").write_text(json.dumps(
        {"in_channels": 1, "classes": 2, "label_values": [0, 7], "size": [32], "normalization": "minmax"}))
    teacher = load(f"torchscript:{tmp_path / 'foreign.pt'}")
    assert teacher.card.label_values == [0, 7] and teacher.card.size == [32]
    image = np.random.default_rng(0).random((3, 50, 40)).astype(np.float32)  # RGB in, the model takes grey
    probs = infer_probs(teacher, image)
    assert probs.shape == (2, 50, 40)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    with pytest.raises(NaktError, match="missing key 'classes'"):
        (tmp_path / "foreign.pt.json").write_text(json.dumps({"in_channels": 1}))
        load(f"torchscript:{tmp_path / 'foreign.pt'}")


def test_pretrained_encoder_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    donor = load("smp:Unet/resnet18", in_channels=3, classes=2)
    encoder_state = {k: v.clone() for k, v in donor.net.encoder.state_dict().items()}
    save_file(encoder_state, str(tmp_path / "resnet18_encoder.safetensors"))
    torch.save(encoder_state, tmp_path / "resnet18_encoder.pth")
    from nakt.models import ModelCard, build_model

    for name in ("resnet18_encoder.safetensors", "resnet18_encoder.pth"):
        model = build_model(ModelCard("smp:Unet/resnet18", 3, 2), pretrained=str(tmp_path / name))
        torch.testing.assert_close(model.net.encoder.layer1[0].conv1.weight, donor.net.encoder.layer1[0].conv1.weight)
    grey = build_model(ModelCard("smp:Unet/resnet18", 1, 2), pretrained=str(tmp_path / "resnet18_encoder.pth"))
    torch.testing.assert_close(grey.net.encoder.layer4[1].conv2.weight, donor.net.encoder.layer4[1].conv2.weight)
    with pytest.raises(NaktError, match="only 0 of its"):
        build_model(ModelCard("monai:UNet", 1, 2), pretrained=str(tmp_path / "resnet18_encoder.pth"))
    # one tensor that happens to fit among many that do not: another architecture, refused (it used to load)
    stray = {"encoder.conv1.weight": donor.net.encoder.conv1.weight.clone(),
             **{f"features.{i}.weight": torch.zeros(3, 3) for i in range(10)}}
    torch.save(stray, tmp_path / "stray.pth")
    with pytest.raises(NaktError, match="only 1 of its 11 tensors match"):
        build_model(ModelCard("smp:Unet/resnet18", 3, 2), pretrained=str(tmp_path / "stray.pth"))


def test_yaml_config_fills_options_and_rejects_unknown_keys(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"model": "monai:UNet", "epochs": 3, "size": [64],
                                                     "images": "a", "masks": "b", "out": "c"}))
    opts = make_options(TrainOptions, tmp_path / "t.yaml", epochs=5)
    assert opts.epochs == 5 and opts.size == [64] and opts.model == "monai:UNet"
    (tmp_path / "bad.yaml").write_text("model: x\nepoch: 3\n")
    with pytest.raises(NaktError, match="bad.yaml: unknown key 'epoch'"):
        make_options(TrainOptions, tmp_path / "bad.yaml")


def test_training_is_deterministic_under_a_seed(synthetic2d, tmp_path):
    s = synthetic2d / "splits.json"
    runs = []
    for i in range(2):
        runs.append(nakt.train(model="monai:UNet", images=str(synthetic2d / "images"),
                               masks=str(synthetic2d / "masks"), cases=f"{s}:teacher_train",
                               out=str(tmp_path / f"r{i}"),
                               size=[32], epochs=1, batch_size=4, seed=3, progress=False, device="cpu"))
    from nakt.io.rundir import read_weights

    a, b = (read_weights(r) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_model_leaves_the_card_it_is_given_alone():
    """The wrapped model carries the network's size divisor (Unet/resnet18 downsamples 32x); the caller's card
    is not changed (it used to be, so a card reused for a second model carried the first one's divisor)."""
    from nakt.models import ModelCard, build_model

    card = ModelCard("smp:Unet/resnet18", 1, 2)
    model = build_model(card)
    assert model.card.size_divisor == 32 and card.size_divisor == 1
    assert model(torch.zeros(1, 1, 40, 50)).shape == (1, 2, 40, 50)  # padded to the divisor and cropped back
