"""The multimodal detector: early RGB+IR fusion, the SuperYOLO backbone/neck, and a YOLOv5 Detect head."""
from __future__ import annotations

import math

import torch
from torch import nn

from ghost_deploy.model.blocks import C3, SPP, Concat, Conv, Upsample
from ghost_deploy.model.configs import ModelConfig, get_config
from ghost_deploy.model.sr import SRBranch

INPUT_MODES = {"rgb": ("rgb",), "ir": ("ir",), "rgb+ir": ("rgb", "ir")}
INPUT_CHANNELS = {"rgb": 3, "ir": 1}


class Detect(nn.Module):
    """One 1x1 conv per level giving `na * (nc + 5)` channels; decoding lives in `evaluate.decode_heads`.

    `anchors` are stored in grid units (pixels / stride), as YOLOv5 stores them.
    """

    def __init__(self, nc: int, anchors_pixels: tuple, in_chs: tuple[int, ...], strides: tuple[float, ...]):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors_pixels)
        self.na = len(anchors_pixels[0]) // 2
        stride = torch.tensor(strides, dtype=torch.float32)
        anchors = torch.tensor(anchors_pixels, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("stride", stride)
        self.register_buffer("anchors", anchors / stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in in_chs)
        self._init_biases()

    def _init_biases(self) -> None:
        # YOLOv5's prior: ~8 objects per 640 px image, class probability ~0.6 / nc.
        for conv, s in zip(self.m, self.stride.tolist()):
            bias = conv.bias.detach().view(self.na, -1)
            bias[:, 4] += math.log(8 / (640 / s) ** 2)
            bias[:, 5:] += math.log(0.6 / (self.nc - 0.99)) if self.nc > 1 else 0.0
            conv.bias = nn.Parameter(bias.view(-1))

    @property
    def anchors_pixels(self) -> torch.Tensor:
        return self.anchors * self.stride.view(-1, 1, 1)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.m, features)]


class Detector(nn.Module):
    """SuperYOLO detector. `forward(*inputs)` takes the sensors in `input_names` order and returns raw head maps.

    For `rgb+ir` the two sensors arrive as separate inputs and are fused by a channel concat inside the
    network (pixel-level early fusion, as GHOST does), so an exported model has two real sensor inputs.
    """

    def __init__(self, config: ModelConfig, nc: int, input_mode: str = "rgb+ir", sr: bool = False):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {sorted(INPUT_MODES)}, got {input_mode!r}")
        self.config = config
        self.nc = nc
        self.input_mode = input_mode
        self.input_names = INPUT_MODES[input_mode]
        in_chs = sum(INPUT_CHANNELS[name] for name in self.input_names)
        layers, self.sources, out_chs, strides = self._build(config, in_chs)
        detect_strides = tuple(float(strides[i]) for i in config.detect_from)
        detect = Detect(nc, config.anchors, tuple(out_chs[i] for i in config.detect_from), detect_strides)
        self.model = nn.ModuleList([*layers, detect])
        self.layer_channels = out_chs
        self.sr = None
        if sr:

            self.sr = SRBranch(
                out_chs[config.sr_low_layer], out_chs[config.sr_high_layer], in_chs,
                feats=config.sr_feats, resblocks=config.sr_resblocks,
            )

    @staticmethod
    def _build(config: ModelConfig, in_chs: int):
        layers, sources, out_chs, strides = [], [], [], []
        for index, (source, op, args) in enumerate(config.layers[: config.num_layers]):
            prev_chs = out_chs[-1] if out_chs else in_chs
            prev_stride = strides[-1] if strides else 1
            if op == "Conv":
                width, kernel, stride = args
                layer, chs, layer_stride = Conv(prev_chs, config.channels(width), kernel, stride), config.channels(width), prev_stride * stride
            elif op == "C3":
                width, repeats, shortcut = args
                chs = config.channels(width)
                layer, layer_stride = C3(prev_chs, chs, config.repeats(repeats), shortcut), prev_stride
            elif op == "SPP":
                chs = config.channels(args[0])
                layer, layer_stride = SPP(prev_chs, chs), prev_stride
            elif op == "Upsample":
                layer, chs, layer_stride = Upsample(), prev_chs, prev_stride // 2
            elif op == "Concat":
                layer, chs, layer_stride = Concat(), sum(out_chs[i] for i in source), prev_stride
            else:
                raise ValueError(f"layer {index}: unknown op {op}")
            layers.append(layer)
            sources.append(source)
            out_chs.append(chs)
            strides.append(layer_stride)
        return layers, sources, out_chs, strides

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def fuse_inputs(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"model takes inputs {self.input_names}, got {len(inputs)} tensors")
        return inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)

    def forward_features(self, *inputs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Raw head maps and the output of every layer before Detect (the distillation features)."""
        x = self.fuse_inputs(*inputs)
        features: list[torch.Tensor] = []
        for layer, source in zip(self.model[:-1], self.sources):
            if isinstance(source, tuple):
                x = layer([features[i] if i >= 0 else x for i in source])
            else:
                x = layer(x)
            features.append(x)
        heads = self.detect([features[i] for i in self.config.detect_from])
        return heads, features

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(*inputs)[0]

    def forward_sr(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Super-resolved input (2x the detector input) from the SR branch; training only."""
        if self.sr is None:
            raise RuntimeError("this model was built without the SR branch")
        return self.sr(features[self.config.sr_low_layer], features[self.config.sr_high_layer])

    def detector_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the SR branch: what a student, an export or an engine needs."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sr.")}


def build_model(name: str, nc: int = 8, input_mode: str = "rgb+ir", sr: bool = False) -> Detector:
    """Build a detector by config name (`ghost-s`, `ghost-s-vedai`, `ghost-n`, `ghost-n-vedai`)."""
    model = Detector(get_config(name), nc=nc, input_mode=input_mode, sr=sr)
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = 1e-3, 0.03
