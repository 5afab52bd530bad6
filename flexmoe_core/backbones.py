"""Feature extractors shared by all experts: a small CNN and a ResNet-18-style net."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Two conv blocks, pooled to 4x4, then a linear projection.

    Works for any input size of at least 4x4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR).
    With ``pool`` each block halves the resolution first, which cuts the cost on
    32x32 inputs about tenfold (the CPU-scale presets use it).
    """

    def __init__(self, in_channels: int, width: int, feature_dim: int, pool: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, 2 * width), nn.AdaptiveAvgPool2d(4)
        )
        self.project = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return features of shape (batch, feature_dim)."""
        return self.project(self.features(x))


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


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as used in FL papers."""

    def __init__(self, in_channels: int, width: int, feature_dim: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_planes = width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [
                BasicBlock(in_planes, planes, stride),
                BasicBlock(planes, planes, 1),
            ]
            in_planes = planes
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.project = (
            nn.Identity() if feature_dim == in_planes else nn.Linear(in_planes, feature_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return features of shape (batch, feature_dim)."""
        return self.project(self.features(x))


def build_backbone(
    name: str, in_channels: int, width: int, feature_dim: int, pool: bool = False
) -> nn.Module:
    """Return the backbone called ``name`` (``cnn`` or ``resnet18``)."""
    if name == "cnn":
        return SmallCNN(in_channels, width, feature_dim, pool)
    if name == "resnet18":
        return ResNet18(in_channels, width, feature_dim)
    raise ValueError(f"Unknown backbone {name!r}: choose 'cnn' or 'resnet18'.")
