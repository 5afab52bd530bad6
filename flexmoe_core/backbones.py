"""The networks the MoE is cut from, as lists of named stages: a small CNN and a ResNet-18.

Each network is a sequence of stages ending with the classifier head. The MoE point
(``model.moe_from``) cuts it in two: the stages before it form the shared trunk (built
once), and every expert is a fresh copy of the stages from it on, so an expert carries
the last conv stage(s) and the head — most of the network's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

BACKBONES = ("cnn", "resnet18")


@dataclass(frozen=True)
class Stage:
    """One named stage: how to build it and what it returns."""

    name: str
    out_channels: int  # channels of the feature map it returns (the head returns logits)
    build: Callable[[], nn.Module]


def conv_block(cin: int, cout: int, downsample: str | None = None) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU; halving the resolution if ``downsample`` says how.

    ``stride``: the conv itself strides by 2 (cheap: nothing runs at full resolution
    but the conv); ``maxpool``: a 2x2 max-pool after the ReLU; ``None``: no downsampling.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=2 if downsample == "stride" else 1, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if downsample == "maxpool":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def cnn_stages(
    in_channels: int, num_classes: int, width: int, feature_dim: int, pool: bool
) -> list[Stage]:
    """Return the small CNN: two conv blocks, then a head (pool to 4x4, projection, classifier).

    Works for any input of at least 4x4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR). With
    ``pool`` each block halves the resolution — block1 by a stride-2 conv, so the shared
    trunk does little work at full resolution, block2 by a max-pool — which cuts the
    cost on 32x32 inputs more than tenfold (the CPU-scale presets use it).
    """
    return [
        Stage("block1", width, lambda: conv_block(in_channels, width, "stride" if pool else None)),
        Stage(
            "block2", 2 * width, lambda: conv_block(width, 2 * width, "maxpool" if pool else None)
        ),
        Stage(
            "head",
            0,
            lambda: nn.Sequential(
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(2 * width * 16, feature_dim),
                nn.ReLU(inplace=True),
                nn.Linear(feature_dim, num_classes),
            ),
        ),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs and a shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        return self.relu(self.body(x) + self.shortcut(x))


def resnet_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Two basic blocks; the first one changes width and resolution."""
    return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))


def resnet18_stages(in_channels: int, num_classes: int, width: int) -> list[Stage]:
    """Return ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as used in FL papers."""
    w = [width, 2 * width, 4 * width, 8 * width]
    return [
        Stage(
            "stem",
            w[0],
            lambda: nn.Sequential(
                nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False),
                nn.BatchNorm2d(w[0]),
                nn.ReLU(inplace=True),
            ),
        ),
        Stage("layer1", w[0], lambda: resnet_layer(w[0], w[0], 1)),
        Stage("layer2", w[1], lambda: resnet_layer(w[0], w[1], 2)),
        Stage("layer3", w[2], lambda: resnet_layer(w[1], w[2], 2)),
        Stage("layer4", w[3], lambda: resnet_layer(w[2], w[3], 2)),
        Stage(
            "head",
            0,
            lambda: nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[3], num_classes)
            ),
        ),
    ]


def network_stages(
    name: str,
    in_channels: int,
    num_classes: int,
    width: int,
    feature_dim: int = 64,
    pool: bool = False,
) -> list[Stage]:
    """Return the stages of the network called ``name`` (``cnn`` or ``resnet18``)."""
    if name == "cnn":
        return cnn_stages(in_channels, num_classes, width, feature_dim, pool)
    if name == "resnet18":
        return resnet18_stages(in_channels, num_classes, width)
    raise ValueError(f"Unknown backbone {name!r}: choose one of {BACKBONES}.")


def moe_cut_problems(name: str, moe_from: str) -> list[str]:
    """Return what is wrong with cutting network ``name`` at stage ``moe_from`` (empty: fine).

    Any stage but the first may start the experts: the trunk keeps the stages before it.
    """
    choices = [s.name for s in network_stages(name, 1, 1, 1)][1:]  # builders are not called
    if moe_from in choices:
        return []
    return [
        f"not a stage of {name}: choose one of {choices} "
        "(the trunk keeps the stages before it, each expert the rest)"
    ]
