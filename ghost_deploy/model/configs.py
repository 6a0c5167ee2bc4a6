"""Model configs as data (timm style): one architecture table, a few named variants.

The table is SuperYOLO's `SRyolo_noFocus.yaml` as GHOST trains it: YOLOv5s-like, no Focus, a stride-1
stem, so the three heads sit at strides 4, 8 and 16. Channel counts are given at width 1.0 and
repeats at depth 1.0, scaled by the variant's multiples exactly as YOLOv5 scales them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ghost_deploy.errors import UserError

# (from, op, args). Conv: (out, kernel, stride); C3: (out, repeats, shortcut); SPP: (out,).
LAYERS: tuple = (
    (-1, "Conv", (64, 3, 1)),  # 0  stride 1: no Focus
    (-1, "Conv", (128, 3, 2)),  # 1  /2
    (-1, "C3", (128, 3, True)),  # 2
    (-1, "Conv", (256, 3, 2)),  # 3  /4
    (-1, "C3", (256, 9, True)),  # 4  low-level feature of the SR branch
    (-1, "Conv", (512, 3, 2)),  # 5  /8
    (-1, "C3", (512, 9, True)),  # 6
    (-1, "Conv", (1024, 3, 2)),  # 7  /16
    (-1, "SPP", (1024,)),  # 8  high-level feature of the SR branch
    (-1, "C3", (1024, 3, False)),  # 9
    (-1, "Conv", (512, 1, 1)),  # 10
    (-1, "Upsample", ()),  # 11
    ((-1, 6), "Concat", ()),  # 12
    (-1, "C3", (512, 3, False)),  # 13
    (-1, "Conv", (256, 1, 1)),  # 14
    (-1, "Upsample", ()),  # 15
    ((-1, 4), "Concat", ()),  # 16
    (-1, "C3", (256, 3, False)),  # 17  P/4 head input
    (-1, "Conv", (256, 3, 2)),  # 18
    ((-1, 14), "Concat", ()),  # 19
    (-1, "C3", (512, 3, False)),  # 20  P/8 head input
    (-1, "Conv", (512, 3, 2)),  # 21
    ((-1, 10), "Concat", ()),  # 22
    (-1, "C3", (1024, 3, False)),  # 23  P/16 head input
)

# Anchors in input pixels, one row per head (YOLOv5's P3/P4/P5 sets, used here at strides 4/8/16).
ANCHORS_3 = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    depth_multiple: float
    width_multiple: float
    num_layers: int  # layers of LAYERS used before Detect
    detect_from: tuple[int, ...]
    anchors: tuple[tuple[int, ...], ...]
    sr_low_layer: int = 4
    sr_high_layer: int = 8
    sr_resblocks: int = 16
    sr_feats: int = 64
    layers: tuple = field(default=LAYERS, repr=False)

    @property
    def max_stride(self) -> int:
        """The deepest downsampling of the input (an input side must be a multiple of it): 16 here, stride-1 stem."""
        strides: list[int] = []
        for source, op, args in self.layers[: self.num_layers]:
            before = strides[source if isinstance(source, int) else source[0]] if strides else 1
            strides.append(before * args[2] if op == "Conv" else before // 2 if op == "Upsample" else before)
        return max(strides)

    def channels(self, width: int) -> int:
        return make_divisible(width * self.width_multiple, 8)

    def repeats(self, repeats: int) -> int:
        return max(round(repeats * self.depth_multiple), 1) if repeats > 1 else repeats

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "depth_multiple": self.depth_multiple,
            "width_multiple": self.width_multiple,
            "num_layers": self.num_layers,
            "detect_from": list(self.detect_from),
            "anchors": [list(a) for a in self.anchors],
            "sr_resblocks": self.sr_resblocks,
            "sr_feats": self.sr_feats,
        }


def make_divisible(value: float, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


CONFIGS: dict[str, ModelConfig] = {
    # SRyolo_noFocus: NWPU VHR-10, DOTA, DIOR.
    "ghost-s": ModelConfig("ghost-s", 0.33, 0.50, 24, (17, 20, 23), ANCHORS_3),
    # SRyolo_noFocus_small (VEDAI): layers 0-17, one head at stride 4.
    "ghost-s-vedai": ModelConfig("ghost-s-vedai", 0.33, 0.50, 18, (17,), ANCHORS_3[:1]),
    # Same architecture at a quarter width: the embedded demo set trains in minutes on a CPU.
    "ghost-n": ModelConfig("ghost-n", 0.33, 0.25, 24, (17, 20, 23), ANCHORS_3, sr_resblocks=4, sr_feats=32),
    # An eighth of the width: the demo recipe's model, small enough to train on a 2-core CPU in minutes.
    "ghost-p": ModelConfig("ghost-p", 0.33, 0.125, 24, (17, 20, 23), ANCHORS_3, sr_resblocks=2, sr_feats=16),
    "ghost-n-vedai": ModelConfig("ghost-n-vedai", 0.33, 0.25, 18, (17,), ANCHORS_3[:1], sr_resblocks=4, sr_feats=32),
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise UserError(None, f"unknown model {name!r}; known: {', '.join(CONFIGS)}") from None
