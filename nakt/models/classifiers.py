"""``timm:<name>`` and ``torchvision:<name>``: image classifiers, any input channel count, random weights unless a
local weights file is given."""

from __future__ import annotations

from torch import nn

from nakt.errors import NaktError, look_up_option
from nakt.models.registry import scheme
from nakt.models.weights import load_pretrained


@scheme("timm")
def build_timm(name: str, *, in_channels: int, classes: int, spatial_dims: int = 2,
               pretrained: str | None = None, **kw) -> tuple[nn.Module, int]:
    """A timm classifier (``resnet18``, ``densenet121``, ``mobilenetv2_100``, ``efficientnet_b0``, ...)."""
    import timm

    if spatial_dims != 2:
        raise NaktError(None, f"timm:{name} is 2D only")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise NaktError(None, f"unknown timm model {name!r}", f"similar: {', '.join(close) or 'none'}")
    net = timm.create_model(name, pretrained=False, num_classes=classes, in_chans=in_channels, **kw)
    if pretrained:
        load_pretrained(net, pretrained)
    return net, 1


class _ChannelAdapter(nn.Sequential):
    """A 1x1 convolution mapping any channel count to the 3 channels torchvision's classifiers expect."""


@scheme("torchvision")
def build_torchvision(name: str, *, in_channels: int, classes: int, spatial_dims: int = 2,
                      pretrained: str | None = None, **kw) -> tuple[nn.Module, int]:
    """A torchvision classifier (``resnet18``, ``densenet121``, ``mobilenet_v2``, ...)."""
    import torchvision

    if spatial_dims != 2:
        raise NaktError(None, f"torchvision:{name} is 2D only")
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        look_up_option(name, names, "torchvision model")
    net = torchvision.models.get_model(name, weights=None, num_classes=classes, **kw)
    if pretrained:
        load_pretrained(net, pretrained)
    if in_channels != 3:
        net = _ChannelAdapter(nn.Conv2d(in_channels, 3, kernel_size=1), net)
    return net, 1
