"""BatchNorm folding that keeps the integer weight codes.

In eval, BN is y = g * (conv(x) + b - mean) + beta with g = gamma / sqrt(var + eps), one factor per output
channel. A quantized conv computes conv(x, codes * s) with one scale s per output channel, so
g * conv(x, codes * s) = conv(x, codes * (s * g)): folding only rescales, the codes stay. A negative g
would make the scale negative, so the codes of that channel are negated instead (the range is symmetric,
so -code is always a valid code) and the scale is |s * g|. A channel with gamma == 0 outputs beta alone:
its codes become 0. The folded bias is beta + (b - mean) * g, kept in float32.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ghost_deploy.quant.quantizers import MIN_SCALE, QuantConv2d


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) where every Conv block's BN is folded into its conv and becomes Identity.

    Works for float convs (plain folding, for FP32 export) and for QuantConv2d (exact: codes unchanged up to
    the sign of gamma, scales absorb gamma / sigma).
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        bn, conv = getattr(module, "bn", None), getattr(module, "conv", None)
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, (nn.Conv2d, QuantConv2d)):
            continue
        _fold_into(conv, bn)
        module.bn = nn.Identity()
    return folded


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # g = gamma / sigma, per channel
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = bn.bias.detach() + (bias - bn.running_mean) * factor
    if isinstance(conv, QuantConv2d) and conv.weight_quantizer is not None:
        codes = conv.weight_codes().to(torch.float32)
        scale = conv.weight_scale()
        sign = torch.where(factor < 0, -1.0, 1.0)
        new_scale = (scale * factor).abs()
        dead = new_scale < MIN_SCALE  # gamma == 0 (or vanishing): the channel is its bias alone
        new_codes = torch.where(dead[:, None, None, None], 0.0, codes * sign[:, None, None, None])
        new_scale = torch.where(dead, scale, new_scale)
        conv.weight_quantizer.scale.copy_(new_scale)
        # codes * scale re-quantizes to exactly these codes: |code| <= 127, so the relative rounding error
        # of (c * s) * (1 / s) is far below 0.5 / 127.
        conv.weight.copy_(new_codes * new_scale[:, None, None, None])
    else:
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.clone())
    else:
        conv.bias.copy_(new_bias)
