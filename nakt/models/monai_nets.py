"""``monai:<Net>``: MONAI networks, 2D or 3D, with small defaults that train on a CPU."""

from __future__ import annotations

from torch import nn

from nakt.errors import NaktError, look_up_option
from nakt.models.registry import scheme
from nakt.models.weights import load_pretrained

# name -> (default kwargs, size divisor). Channels are kept small: these nets train from scratch.
_NETS = {
    "UNet": (dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2), 16),
    "BasicUNet": (dict(features=(16, 16, 32, 64, 128, 16)), 16),
    "SegResNet": (dict(init_filters=16), 8),
    "AttentionUnet": (dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)), 16),
    "DynUNet": (dict(kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2, 2, 2, 2]), 16),
    "VNet": (dict(), 16),
}


@scheme("monai")
def build_monai(name: str, *, in_channels: int, classes: int, spatial_dims: int = 2,
                pretrained: str | None = None, **kw) -> tuple[nn.Module, int]:
    """Build a MONAI network by class name (``UNet``, ``BasicUNet``, ``SegResNet``, ``AttentionUnet``...)."""
    from monai.networks import nets

    name = look_up_option(name, _NETS, "monai network")
    defaults, divisor = _NETS[name]
    args = {**defaults, **kw}
    try:
        net = getattr(nets, name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=classes,
                                  **args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise NaktError(None, f"cannot build monai:{name} ({exc})") from None
    if pretrained:
        load_pretrained(net, pretrained)
    return net, divisor
