"""The super-resolution auxiliary branch (SuperYOLO): training-only, never exported.

A DeepLab-style decoder joins a stride-4 low-level feature and the SPP output, then EDSR upsamples x8,
giving 2x the detector input: the high-resolution image is the target (an L1 loss in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.ReLU(), nn.Conv2d(feats, feats, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class SRBranch(nn.Module):
    def __init__(self, low_chs: int, high_chs: int, out_chs: int, feats: int = 64, resblocks: int = 16):
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(low_chs, feats, 1), nn.ReLU())
        self.high = nn.Sequential(nn.Conv2d(high_chs, feats * 4, 1), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Conv2d(feats * 5, feats * 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(feats * 4, feats * 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(feats * 2, feats, 1),
        )
        self.head = nn.Conv2d(feats, feats, 3, padding=1)
        self.body = nn.Sequential(*(ResBlock(feats) for _ in range(resblocks)), nn.Conv2d(feats, feats, 3, padding=1))
        upsampler = []
        for _ in range(3):  # x8: from stride 4 back to twice the input resolution
            upsampler += [nn.Conv2d(feats, feats * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*upsampler)
        self.tail = nn.Conv2d(feats, out_chs, 3, padding=1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.low(low)
        high = F.interpolate(self.high(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.decoder(torch.cat((low, high), dim=1))
        x = self.head(x)
        x = x + self.body(x)
        return self.tail(self.upsample(x))
