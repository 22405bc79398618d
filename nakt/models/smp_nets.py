"""``smp:<Arch>/<encoder>``: every segmentation-models-pytorch architecture with any of its encoders."""

from __future__ import annotations

from torch import nn

from nakt.errors import NaktError, look_up_option
from nakt.models.registry import scheme
from nakt.models.weights import load_pretrained


@scheme("smp")
def build_smp(name: str, *, in_channels: int, classes: int, spatial_dims: int = 2,
              pretrained: str | None = None, **kw) -> tuple[nn.Module, int]:
    """Build ``Arch/encoder`` (e.g. ``Unet/resnet18``) with random weights, or the encoder from a local file.

    Downloads never happen: `pretrained` is the path of an encoder (or whole-model) weights file.
    """
    import segmentation_models_pytorch as smp

    if spatial_dims != 2:
        raise NaktError(None, f"smp:{name} is 2D only", "use a monai: spec for 3D data")
    arch, _, encoder = name.partition("/")
    archs = {a.lower(): a for a in smp.MODEL_ARCHITECTURES_MAPPING}
    arch = look_up_option(arch.lower(), archs, "smp architecture")
    encoder = encoder or "resnet34"
    look_up_option(encoder, smp.encoders.get_encoder_names(), "smp encoder")
    try:
        net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                               classes=classes, **kw)
    except (TypeError, ValueError, AssertionError) as exc:
        raise NaktError(None, f"cannot build smp:{name} ({exc})") from None
    if pretrained:
        try:
            load_pretrained(net.encoder, pretrained)
        except NaktError:
            load_pretrained(net, pretrained)
    depth = kw.get("encoder_depth", 5)
    return net, 2**depth
