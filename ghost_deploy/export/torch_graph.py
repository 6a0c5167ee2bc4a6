"""PyTorch side of the export: the BN-folded float graph with marked activation quantizers.

`torch.onnx.export` refuses fake-quant ranges other than (-128,127)/(0,255)/(0,127), so the Q/DQ nodes are
written afterwards from the trained integers (onnx_qdq.py). What this module exports is the same network
with BN folded, each quantized weight replaced by its exact dequantized value codes * scale (a parameter, so
the ONNX initializer keeps its state_dict name, e.g. `model.3.conv.weight`), and each activation quantizer
replaced by a marker op `ghost_export::ActQuant(key=...)` exactly where the quantizer runs (in a conv, or in
a block's pre-hook so a residual add reads the quantized tensor too).
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from ghost_deploy.errors import UserError
from ghost_deploy.model import Detector
from ghost_deploy.quant import QuantConv2d, act_quantizers, fold_bn
from ghost_deploy.quant.quantizers import MIN_SCALE

MARKER_DOMAIN = "ghost_export"
MARKER_OP = "ActQuant"
WRAPPER_PREFIX = "detector."  # ExportWrapper's attribute: ONNX initializer names are "detector." + state_dict key


@dataclass
class ConvSpec:
    """One conv as the QDQ writer needs it (after BN folding)."""

    name: str  # module path = bit-plan layer name
    weight_bits: int | None  # None: float weights
    act_key: str | None  # key of its input quantizer in model.act_quantizers; None: float input
    codes: np.ndarray | None = None  # int8 (out, in/g, k, k), folded
    weight_scale: np.ndarray | None = None  # float32 (out,), folded
    expected_codes: np.ndarray | None = None  # the trained quantizer's codes, with BN's sign applied


@dataclass
class ActSpec:
    key: str
    bits: int
    scale: float
    readers: list[str] = field(default_factory=list)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


class _ActQuantMarker(torch.autograd.Function):
    """Identity in PyTorch; one custom node in the ONNX, replaced by Q/DQ afterwards."""

    @staticmethod
    def forward(ctx, x, key):  # noqa: ARG004 - key is read by `symbolic`
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, key_s=key)
        out.setType(x.type())
        return out


def _marker(key: str):
    def forward(x):
        return _ActQuantMarker.apply(x, key)

    return forward


class DecodeHeads(nn.Module):
    """Raw head maps -> (B, N, 5+nc) boxes, the arithmetic of `postprocess.decode_heads_np`, with constant
    grids and reshapes that keep the batch dimension free (-1) so the ONNX has a dynamic batch."""

    def __init__(self, strides, anchors_pixels, nc: int, sizes: list[tuple[int, int]]):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.strides = [float(s) for s in strides]
        self.sizes = sizes
        anchors = torch.tensor(anchors_pixels, dtype=torch.float32)
        self.na = anchors.shape[1]
        for level, (height, width) in enumerate(sizes):
            grid_y, grid_x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            grid = torch.stack((grid_x, grid_y), -1).view(1, 1, height, width, 2).float()
            self.register_buffer(f"grid{level}", grid, persistent=False)
            self.register_buffer(f"anchor{level}", anchors[level].view(1, self.na, 1, 1, 2), persistent=False)

    def forward(self, heads: list[torch.Tensor]) -> torch.Tensor:
        outputs = []
        for level, head in enumerate(heads):
            height, width = self.sizes[level]
            p = torch.sigmoid(head.reshape(-1, self.na, self.no, height, width).permute(0, 1, 3, 4, 2))
            xy = (p[..., :2] * 2 - 0.5 + getattr(self, f"grid{level}")) * self.strides[level]
            wh = (p[..., 2:4] * 2) ** 2 * getattr(self, f"anchor{level}")
            outputs.append(torch.cat((xy, wh, p[..., 4:]), -1).reshape(-1, self.na * height * width, self.no))
        return torch.cat(outputs, 1)


class ExportWrapper(nn.Module):
    """detector(*inputs) -> head maps (and the decoded boxes), as a flat tuple for the exporter."""

    def __init__(self, detector: nn.Module, decode: DecodeHeads | None):
        super().__init__()
        self.detector = detector
        self.decode = decode

    def forward(self, *inputs):
        heads = list(self.detector(*inputs))
        if self.decode is None:
            return tuple(heads)
        return (*heads, self.decode(heads))


def head_names(strides) -> list[str]:
    return [f"head_s{int(round(float(s)))}" for s in strides]


def make_wrapper(model: nn.Module, meta: dict, img_size: int, decode: bool) -> ExportWrapper:
    decoder = None
    if decode:
        strides = meta.strides
        sizes = [(img_size // int(round(s)), img_size // int(round(s))) for s in strides]
        decoder = DecodeHeads(strides, meta.anchors_pixels, int(meta.nc), sizes)
    return ExportWrapper(model, decoder).eval()


def float_copy(model: nn.Module) -> nn.Module:
    """The student without quantizers (latent float weights), or the model itself if it has none."""
    if not any(isinstance(m, QuantConv2d) for m in model.modules()):
        return copy.deepcopy(model).eval()
    plain = Detector(model.config, nc=model.nc, input_mode=model.input_mode, sr=False)
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def conv_specs(model: nn.Module) -> tuple[dict[str, ConvSpec], dict[str, ActSpec], nn.Module]:
    """Fold BN (quant.fold_bn, codes kept) and collect every conv's codes, scales and input quantizer.

    Returns the specs and the folded model, whose quantized weights are already codes * scale.
    """

    trained = {name: module for name, module in model.named_modules() if isinstance(module, (QuantConv2d, nn.Conv2d))}
    folded = fold_bn(model)
    quantizer_keys = {id(q): key for key, q in act_quantizers(folded).items()}
    acts = {key: ActSpec(key, int(q.bits), float(q.scale.detach().clamp_min(MIN_SCALE)))
            for key, q in act_quantizers(folded).items()}
    convs: dict[str, ConvSpec] = {}
    for name, module in folded.named_modules():
        if name.startswith("sr.") or not isinstance(module, (QuantConv2d, nn.Conv2d)):
            continue
        spec = ConvSpec(name=name, weight_bits=None, act_key=None)
        if isinstance(module, QuantConv2d):
            if module.input_quantizer is not None:
                spec.act_key = quantizer_keys.get(id(module.input_quantizer))
                if spec.act_key is None:
                    raise UserError(None, f"{name}: input quantizer is not registered in model.act_quantizers")
                acts[spec.act_key].readers.append(name)
            if module.weight_quantizer is not None:
                spec.weight_bits = int(module.weight_bits)
                spec.codes = module.weight_codes().numpy().astype(np.int8)
                spec.weight_scale = module.weight_scale().numpy().astype(np.float32)
                spec.expected_codes = _expected_codes(model, trained[name], name)
                with torch.no_grad():
                    # exactly what DequantizeLinear computes: float32(code) * scale
                    module.weight.copy_(torch.from_numpy(spec.codes.astype(np.float32) * spec.weight_scale[:, None, None, None]))
                module.weight_quantizer = None
        convs[name] = spec
    return convs, acts, folded


def _expected_codes(model: nn.Module, trained_conv, name: str) -> np.ndarray:
    """The trained codes after BN folding: the sign of gamma/sigma flips a channel; gamma == 0 zeroes it."""
    codes = trained_conv.weight_codes().numpy().astype(np.int16)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    bn = getattr(parent, "bn", None)
    if attr != "conv" or not isinstance(bn, nn.BatchNorm2d):
        return codes.astype(np.int8)
    factor = (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).numpy()
    dead = np.abs(trained_conv.weight_scale().numpy() * factor) < MIN_SCALE
    codes = codes * np.where(factor < 0, -1, 1)[:, None, None, None]
    codes[dead] = 0
    return codes.astype(np.int8)


def install_markers(folded: nn.Module) -> None:
    """Every activation quantizer of `folded` becomes a marker (in place: run on an export copy only)."""
    for key, quantizer in act_quantizers(folded).items():
        quantizer.forward = _marker(key)


def export_float_graph(wrapper: ExportWrapper, input_names: list[str], output_names: list[str],
                       example_inputs: tuple[torch.Tensor, ...], opset: int, markers: bool = True) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript exporter: stable for opset 17 and keeps state_dict initializer names)."""
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(wrapper, example_inputs, buffer, input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          custom_opsets={MARKER_DOMAIN: 1} if markers else None, dynamic_axes=dynamic)
    return onnx.load_from_string(buffer.getvalue())
