"""Bit plans made from a model: its traced convs (params, MACs, the tensor each reads) with chosen bits.

The plan itself (`ghost_deploy.bitplan.BitPlan`) is torch-free; this module is what needs the model.
"""
from __future__ import annotations

import dataclasses

from ghost_deploy.bitplan import FLOAT_BITS, BitPlan, LayerPlan
from ghost_deploy.errors import UserError
from ghost_deploy.quant.trace import conv_names, example_inputs, inputs_from_shapes, trace_convs


def check_plan_against_model(plan: BitPlan, model) -> None:
    """UserError naming the plan file and the first unknown, missing or differently shaped layer."""
    names = conv_names(model)
    known = set(names)
    for name in plan.layers:
        if name not in known:
            raise UserError(plan.source, f"unknown layer {name!r}: not a conv of this model")
    for name in names:
        if name not in plan.layers:
            raise UserError(plan.source, f"layer {name!r} is missing from the plan")
    for name in names:  # a plan made for another model of the same layout (ghost-n for ghost-p): its sizes would lie
        recorded, actual = plan.layers[name].out_channels, model.get_submodule(name).out_channels
        if recorded and recorded != actual:  # (a hand-written layer entry records none)
            made_for = f" ({plan.model_name})" if plan.model_name else ""
            raise UserError(plan.source, f"layer {name!r} has {recorded} output channels in the plan, {actual} in this "
                                         f"model: the plan was made for another model{made_for} or class count")


# --- building plans from a model ---
def profile_model(model, input_shapes) -> dict[str, tuple[int, int]]:
    """{conv name: (params, MACs per image)} from one traced forward; MACs = out_elems * in/groups * k*k."""
    return {site.name: (site.params, site.macs) for site in trace_convs(model, inputs_from_shapes(model, input_shapes))}


def model_sites(model, image_size: int = 512, input_shapes=None):
    """The traced conv sites of a Detector at `image_size` (or of any model at `input_shapes`).

    A full-size trace is slow on a CPU, so the Detector is traced at 64 and 128 px; when every conv's MACs
    grow exactly 4x between them (all strides divide the size), they are scaled to `image_size`.
    """
    if input_shapes is not None:
        return trace_convs(model, inputs_from_shapes(model, input_shapes))
    if image_size > 128 and image_size % 64 == 0:
        small, large = trace_convs(model, example_inputs(model, 64)), trace_convs(model, example_inputs(model, 128))
        if all(b.macs == 4 * a.macs for a, b in zip(small, large)):
            factor = (image_size // 64) ** 2
            for site in small:
                site.macs *= factor
            return small
    return trace_convs(model, example_inputs(model, image_size))


def model_name(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "name", type(model).__name__)


def plan_from_bits(model, weight_bits: dict[str, int | None] | int | None, act_bits: int | None = 8,
                   image_size: int = 512, input_shapes=None, method: str = "uniform", criteria: dict | None = None,
                   sites=None, **plan_fields) -> BitPlan:
    """A plan for `model` with the given weight bits (one int for all, or per layer) and activation bits."""
    sites = sites if sites is not None else model_sites(model, image_size, input_shapes)
    layers = {}
    for site in sites:
        bits = weight_bits.get(site.name) if isinstance(weight_bits, dict) else weight_bits
        layers[site.name] = LayerPlan(
            weight_bits=bits, act_bits=act_bits, params=site.params, macs=site.macs,
            criterion=(criteria or {}).get(site.name, method), input_tensor=site.input_tensor,
            act_quantizer=site.act_quantizer,
            out_channels=site.out_channels, bias_params=site.bias_params,
        )
    return BitPlan(layers=layers, method=method, model_name=model_name(model),
                   image_size=image_size if input_shapes is None else None, **plan_fields)


def uniform_plan(model, weight_bits: int | None = 8, act_bits: int | None = 8, image_size: int = 512,
                 float_layers=(), input_shapes=None) -> BitPlan:
    """Every conv at `weight_bits` (float for names in `float_layers`), inputs at `act_bits`."""
    sites = model_sites(model, image_size, input_shapes)
    bits = {site.name: (None if site.name in float_layers else weight_bits) for site in sites}
    return plan_from_bits(model, bits, act_bits, image_size, input_shapes, method="uniform", sites=sites)


def residual_branch_ends(model) -> dict[str, str]:
    """{last conv of each residual branch: the conv that reads the block's input}, e.g.
    {"model.2.m.0.cv2.conv": "model.2.m.0.cv1.conv"}: the add sums the block input and that conv block's output."""
    ends = {}
    for name, module in model.named_modules():
        if getattr(module, "add", False) is True and getattr(module, "branch_end", None):
            ends[f"{name}.{module.branch_end}.conv"] = f"{name}.cv1.conv"
    return ends


def with_residual_outputs(plan: BitPlan, model) -> BitPlan:
    """The plan with an output quantizer on the last conv of every residual branch whose block input is quantized.

    Its bits are the block input's (the add's other operand): both add inputs then sit on integer grids, and
    an integer compiler runs conv, add and the next conv in integers. TensorRT does not need it (it fuses the
    add into the conv, `export.lint` rule `residual-add`), so plans leave it off unless asked
    (`ghost.plan.residual_outputs`, `plan --residual-outputs`). Train with it: it changes the model.
    """
    layers = dict(plan.layers)
    for end, reader in residual_branch_ends(model).items():
        if end not in layers or reader not in layers:
            continue
        bits = layers[reader].act_bits
        if bits != FLOAT_BITS and layers[end].act_bits != FLOAT_BITS:
            layers[end] = dataclasses.replace(layers[end], output_bits=bits)
    return dataclasses.replace(plan, layers=layers)
