"""BatchNorm folded into the convolution before it, for networks that only infer (teachers, predict, evaluate).

An eval-mode BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``; when
its input ``x`` is exactly a convolution's output, the map moves into that convolution's weight and bias and the
BatchNorm becomes `nn.Identity`: one pass over the activations fewer per pair, the same function up to float
rounding. PyTorch does the arithmetic (`torch.nn.utils.fusion.fuse_conv_bn_weights`); this module finds the
pairs without tracing, from structure alone, and folds only pairs whose data flow is certain:

- consecutive children of a plain `nn.Sequential` (one whose class keeps `nn.Sequential.forward`): smp's
  ``Conv2dReLU``, torchvision's ``Conv2dNormActivation`` and resnet ``downsample``, MONAI's ``Convolution``
  (``conv`` then ``adn`` whose first child is the norm), nested plain Sequentials looked into at either end;
- the attribute pairs of classes whose ``forward`` was read (`_ATTRIBUTE_PAIRS`: torchvision, timm and smp
  resnets' ``conv1 -> bn1``...), matched by exact class, so a subclass that rewrites ``forward`` is not trusted.

Never folded: a BatchNorm in training mode or without running statistics, subclasses of either module (timm's
``BatchNormAct2d`` adds an activation, ``Conv2dSame`` pads itself), modules used twice or carrying hooks,
parametrized weights, grouped transposed convolutions. Fold only models that will not be trained or exported
afterwards: the BatchNorm statistics are gone from the folded model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["batchnorm_pairs", "fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# exact class -> (conv, bn) attribute pairs its forward runs back to back (checked in each library's source:
# ``x = self.conv1(x); x = self.bn1(x)``); a conv attribute may be a plain Sequential ending in a conv (timm's
# deep stems)
_RESNET_BLOCKS = {"BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
                  "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))}
_ATTRIBUTE_PAIRS = {
    "torchvision.models.resnet.ResNet": (("conv1", "bn1"),),
    "timm.models.resnet.ResNet": (("conv1", "bn1"),),
    "segmentation_models_pytorch.encoders.resnet.ResNetEncoder": (("conv1", "bn1"),),
    **{f"{library}.{block}": pairs for library in ("torchvision.models.resnet", "timm.models.resnet")
       for block, pairs in _RESNET_BLOCKS.items()},
}


def _plain_sequential(module: nn.Module) -> bool:
    """A Sequential whose forward is `nn.Sequential.forward`: each child's output is exactly the next one's
    input, and nothing else sees it."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module) > 0


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _end(module: nn.Module | None, last: bool) -> tuple[nn.Module | None, bool]:
    """The module that produces (`last`) or first receives a plain Sequential's value (the module itself
    otherwise), and whether a hook on a Sequential on the way could see or change that value."""
    hooked = False
    while module is not None and _plain_sequential(module):
        hooked |= _hooked(module)
        module = module[-1] if last else module[0]
    return module, hooked


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    """`bn` can move into `conv`: exact standard classes, eval-mode statistics, matching channels."""
    if type(conv) not in _CONVS or type(bn) not in _NORMS:
        return False
    if bn.training or bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
        return False
    if _hooked(conv) or _hooked(bn) or parametrize.is_parametrized(conv) or not conv.weight.is_floating_point():
        return False
    # torch's transposed fusion scales weight dim 1, which holds out_channels / groups
    return not (isinstance(conv, nn.modules.conv._ConvTransposeNd) and conv.groups != 1)


def batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The ``(conv, bn)`` pairs `fold_batchnorm` folds: each BatchNorm whose input is exactly the convolution's
    output (see the module docstring), each module once, modules used more than once in `model` left out."""
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    pairs, seen = [], set()

    def add(conv, bn, hooked: bool = False) -> None:
        if hooked or not _foldable(conv, bn) or id(bn) in seen or id(conv) in seen:
            return
        if uses[id(conv)] == 1 and uses[id(bn)] == 1:
            pairs.append((conv, bn))
            seen.update((id(conv), id(bn)))

    for module in model.modules():
        if _plain_sequential(module):
            children = list(module)
            for before, after in zip(children, children[1:]):
                (conv, hooked_a), (bn, hooked_b) = _end(before, last=True), _end(after, last=False)
                add(conv, bn, hooked_a or hooked_b)
        for conv_name, bn_name in _ATTRIBUTE_PAIRS.get(f"{type(module).__module__}.{type(module).__qualname__}", ()):
            (conv, hooked), bn = _end(getattr(module, conv_name, None), last=True), getattr(module, bn_name, None)
            add(conv, bn, hooked)
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every eval-mode BatchNorm that directly follows a convolution (`batchnorm_pairs`) into
    that convolution's weight and bias, and replace it with `nn.Identity`; returns how many were folded.

    The model maps the same inputs ``[B, C_in, *spatial]`` to the same outputs up to float rounding (fp32
    probabilities within 1e-5, tests/test_inference_exact.py). For inference only: call it on a model in eval
    mode that will not be trained or saved afterwards.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> fold_batchnorm(net), type(net[1]).__name__
    (1, 'Identity')
    """
    pairs = batchnorm_pairs(model)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent._modules.items()
               if child is not None}
    for conv, bn in pairs:
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias, transpose=transposed)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
    return len(pairs)
