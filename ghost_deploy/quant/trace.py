"""One traced forward pass that tells, for every conv, what it costs and which tensor feeds it.

The quantizer inventory, the bit plan and the BOPs count all need the same facts: the conv's params and
MACs per image, and the name of the tensor it reads. Convs that read the *same tensor object* (C3.cv1 and
C3.cv2; a neck output feeding a Detect conv and the next stride-2 conv) share that tensor name, and later
one activation quantizer.

Tensors joined by an op that a per-tensor quantizer commutes with (Concat, MaxPool, nearest Upsample) form one
*scale group*: quantized with one scale, Q(concat(a, b)) == concat(Q(a), Q(b)), so a conv whose output feeds
both the next conv and a neck Concat has one exact output quantizer. TensorRT wants Concat inputs on one scale,
and ONNX Runtime can then run that conv as an integer conv (`export.cpu_form`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ghost_deploy.model.blocks import Concat
from ghost_deploy.model.detector import INPUT_CHANNELS

# Sub-trees that never run in an exported detector (the SR branch is training-only).
SKIPPED_PREFIXES = ("sr.",)
INPUT_TENSOR_NAME = "input"
STEM_CONV = "model.0.conv"


@dataclass
class ConvSite:
    name: str  # module path, e.g. "model.2.cv1.conv"
    module: nn.Module
    params: int  # weight elements (bias not included)
    macs: int  # per image: out_elems * in/groups * k*k
    out_channels: int
    bias_params: int  # float per-channel bias after BN folding (or the conv's own bias)
    input_tensor: str  # readable name of the tensor feeding the conv (shared by all its readers)
    act_quantizer: str = ""  # its scale group: the input_tensor of the group's first reader in model order


@dataclass
class Trace:
    sites: list[ConvSite]
    # module name -> label of the tensor it received as first input (equal labels = the same tensor object)
    module_inputs: dict[str, int] = field(default_factory=dict)
    conv_inputs: dict[str, int] = field(default_factory=dict)


# Modules whose output may share its input's quantization scale exactly (they select, copy or take maxima).
def _commutes_with_quantizer(module: nn.Module) -> bool:

    if isinstance(module, nn.Upsample):
        return module.mode == "nearest"
    return isinstance(module, (Concat, nn.MaxPool2d))


def is_conv(module: nn.Module) -> bool:
    # quant.quantizers.QuantConv2d (built on this module, so not imported here) is the conv with a weight_quantizer
    return isinstance(module, nn.Conv2d) or hasattr(module, "weight_quantizer")


def conv_names(model: nn.Module) -> list[str]:
    """Every conv of the deployable network, in `named_modules` order (the SR branch is left out)."""
    return [name for name, module in model.named_modules() if is_conv(module) and not name.startswith(SKIPPED_PREFIXES)]


def example_inputs(model: nn.Module, image_size: int = 64, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Deterministic images for a Detector (`input_names` order); values do not matter for the trace."""
    names = getattr(model, "input_names", None)
    if names is None:
        raise TypeError("model has no input_names; pass input shapes or example inputs explicitly")
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return tuple(
        torch.rand(batch, INPUT_CHANNELS[name], image_size, image_size, generator=generator).to(device) for name in names
    )


def inputs_from_shapes(model: nn.Module, input_shapes) -> tuple[torch.Tensor, ...]:
    """Zero tensors for `input_shapes`: a list of shapes, a dict name -> shape, or one shape."""
    if isinstance(input_shapes, dict):
        names = getattr(model, "input_names", tuple(input_shapes))
        input_shapes = [input_shapes[name] for name in names]
    elif input_shapes and isinstance(input_shapes[0], int):
        input_shapes = [input_shapes]
    device = next(model.parameters()).device
    return tuple(torch.zeros(tuple(shape), device=device) for shape in input_shapes)


def trace_model(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Trace:
    """Run `model(*inputs)` once in eval mode; describe every conv that ran, in `named_modules` order."""
    names = {module: name for name, module in model.named_modules()}
    skipped = {m for n, m in model.named_modules() if n.startswith(SKIPPED_PREFIXES)}
    producers: dict[int, list[str]] = {}  # id(tensor) -> modules that returned it
    module_inputs: dict[str, int] = {}
    conv_input: dict[str, torch.Tensor] = {}
    conv_output: dict[str, torch.Size] = {}
    alive: list[torch.Tensor] = []  # keeps every traced tensor alive, so no id is reused during the pass
    links: list[tuple[int, int]] = []  # (input id, output id) of ops that commute with a quantizer

    def record_input(module, args):
        if module is not model and module not in skipped and args and isinstance(args[0], torch.Tensor):
            alive.append(args[0])
            module_inputs[names[module]] = id(args[0])

    def record_output(module, args, output):
        if module is model or module in skipped:
            return
        if isinstance(output, torch.Tensor):
            alive.append(output)
            producers.setdefault(id(output), []).append(names[module])
        if _commutes_with_quantizer(module) and isinstance(output, torch.Tensor):
            sources = args[0] if isinstance(args[0], (list, tuple)) else args[:1]
            alive.extend(sources)
            links.extend((id(source), id(output)) for source in sources if isinstance(source, torch.Tensor))
        if is_conv(module):
            conv_input[names[module]] = args[0]
            conv_output[names[module]] = output.shape

    handles = [m.register_forward_pre_hook(record_input) for m in model.modules()]
    handles += [m.register_forward_hook(record_output) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    sites = []
    for name in conv_names(model):
        if name not in conv_input:
            continue  # defined but never run: nothing to deploy
        module = model.get_submodule(name)
        weight = module.weight
        out_shape = conv_output[name]
        macs = out_shape.numel() // out_shape[0] * weight.shape[1] * weight.shape[2] * weight.shape[3]
        sites.append(
            ConvSite(
                name=name,
                module=module,
                params=weight.numel(),
                macs=int(macs),
                out_channels=int(weight.shape[0]),
                bias_params=int(weight.shape[0]) if _has_bias_after_fold(model, name, module) else 0,
                input_tensor=_tensor_name(conv_input[name], name, producers, inputs),
            )
        )
    conv_inputs = {name: id(tensor) for name, tensor in conv_input.items()}
    _assign_scale_groups(sites, conv_inputs, links)
    return Trace(sites, module_inputs, conv_inputs)


def _assign_scale_groups(sites: list[ConvSite], conv_inputs: dict[str, int], links: list[tuple[int, int]]) -> None:
    """Union-find over the links; each site's `act_quantizer` names its group after the group's first reader."""
    parent: dict[int, int] = {}

    def find(tensor: int) -> int:
        while parent.get(tensor, tensor) != tensor:
            parent[tensor] = parent.get(parent[tensor], parent[tensor])
            tensor = parent[tensor]
        return tensor

    for a, b in links:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[root_b] = root_a
    group_names: dict[int, str] = {}
    for site in sites:
        site.act_quantizer = group_names.setdefault(find(conv_inputs[site.name]), site.input_tensor)


def trace_convs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[ConvSite]:
    return trace_model(model, inputs).sites


def _has_bias_after_fold(model: nn.Module, name: str, module: nn.Module) -> bool:
    if module.bias is not None:
        return True
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(getattr(parent, "bn", None), nn.BatchNorm2d)


def _tensor_name(tensor: torch.Tensor, consumer: str, producers: dict[int, list[str]], inputs) -> str:
    """The outermost module that returned the tensor ("model_1"), else a name from its reader."""
    made_by = producers.get(id(tensor))
    if made_by:
        return min(made_by, key=lambda n: (n.count("."), n)).replace(".", "_")
    # The Detector fuses its sensors with a torch.cat in fuse_inputs; that tensor feeds the stem conv.
    if any(tensor is t for t in inputs) or consumer == STEM_CONV:
        return INPUT_TENSOR_NAME
    # Built inside a forward (the torch.cat in C3 and SPP): name it after the block that reads it.
    block = consumer[: -len(".conv")] if consumer.endswith(".conv") else consumer
    return f"{block}_in".replace(".", "_")
