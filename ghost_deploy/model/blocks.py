"""Building blocks of SuperYOLO as GHOST uses it: Conv-BN-ReLU, C3, SPP (YOLOv5 shapes, ReLU activation)."""
from __future__ import annotations

import torch
from torch import nn

# YOLOv5's BN settings (initialize_weights in the reference): they change the running statistics, so keep them.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(kernel: int) -> int:
    return kernel // 2


class Conv(nn.Module):
    """Conv2d (no bias, "same" padding) -> BatchNorm -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, autopad(kernel), bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    # The conv block whose output the residual add reads (quant.plans.with_residual_outputs quantizes it).
    branch_end = "cv2"

    def __init__(self, in_chs: int, out_chs: int, shortcut: bool = True, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_chs * expansion)
        self.cv1 = Conv(in_chs, hidden, 1, 1)
        self.cv2 = Conv(hidden, out_chs, 3, 1)
        self.add = shortcut and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convs; `shortcut` decides whether the inner bottlenecks add their input."""

    def __init__(self, in_chs: int, out_chs: int, repeats: int = 1, shortcut: bool = True, expansion: float = 0.5):
        super().__init__()
        hidden = int(out_chs * expansion)
        self.cv1 = Conv(in_chs, hidden, 1, 1)
        self.cv2 = Conv(in_chs, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, out_chs, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, expansion=1.0) for _ in range(repeats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPP(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernels: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        hidden = in_chs // 2
        self.cv1 = Conv(in_chs, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(kernels) + 1), out_chs, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class Upsample(nn.Upsample):
    def __init__(self):
        super().__init__(scale_factor=2, mode="nearest")
