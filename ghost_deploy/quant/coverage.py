"""Range coverage: how much of each activation tensor's range on a whole split a calibration set reaches."""
from __future__ import annotations

import numpy as np
import torch

from ghost_deploy.data.calib import CalibSet, calib_batches
from ghost_deploy.quant import act_quantizers
from ghost_deploy.quant.trace import example_inputs, trace_model

# Running the same image in batches of different sizes can change a float max in its last bits; a set
# that is a subset of the split then reads coverage 1.0000001. Ratios this close to 1 are reported as 1.
COVERAGE_ROUNDING = 1e-5


def range_coverage(model, calib_set, full_split_loader, img_size: int | None = None, batch_size: int = 8) -> dict:
    """{tensor: max|x| on the set / max|x| on the whole split}, per activation quantizer of a quantized
    model, else per conv input tensor of a float model (named as the bit plan names them).

    `calib_set` is a CalibSet or any iterable of input batches; `full_split_loader` yields batch dicts (a
    `make_loader` loader over the split, augment=False) or input tuples. Quantizers pass values through
    unchanged while measuring, so both sides see the float ranges the scales are chosen from.
    """
    if isinstance(calib_set, CalibSet):
        if img_size is None:
            raise ValueError("img_size is needed to letterbox the calibration set")
        calib_set = calib_batches(calib_set, img_size, batch_size, model.input_names)
    return coverage_ratios(tensor_absmax(model, calib_set), tensor_absmax(model, full_split_loader))


def coverage_ratios(on_set: dict[str, float], on_split: dict[str, float]) -> dict[str, float]:
    """Per tensor of the split: set max / split max (1.0 where the split never leaves zero)."""
    coverage = {}
    for tensor, split_max in on_split.items():
        ratio = on_set.get(tensor, 0.0) / split_max if split_max > 0 else 1.0
        coverage[tensor] = 1.0 if 1.0 < ratio <= 1.0 + COVERAGE_ROUNDING else ratio
    return coverage


def tensor_absmax(model, batches) -> dict[str, float]:
    """max|x| per activation tensor over `batches` (eval mode, quantizers passing values through)."""


    quantizers = act_quantizers(model)
    maxima: dict[str, float] = {}
    handles = []

    def recorder(tensor_name):
        def hook(module, args):
            value = float(args[0].detach().abs().max()) if args[0].numel() else 0.0
            maxima[tensor_name] = max(maxima.get(tensor_name, 0.0), value)
        return hook

    if quantizers:
        for tensor_name, quantizer in quantizers.items():
            handles.append(quantizer.register_forward_pre_hook(recorder(tensor_name)))
    else:
        for site in trace_model(model, example_inputs(model, 64)).sites:
            handles.append(site.module.register_forward_pre_hook(recorder(site.input_tensor)))
    observing = {name: q.observing for name, q in quantizers.items()}
    was_training = model.training
    model.eval()
    for quantizer in quantizers.values():
        quantizer.observing = True  # pass-through
    try:
        with torch.no_grad():
            for batch in batches:
                model(*as_model_inputs(batch, model))
    finally:
        for handle in handles:
            handle.remove()
        for name, quantizer in quantizers.items():
            quantizer._reset_observation()  # drop the samples it kept while passing values through
            quantizer.observing = observing[name]
        model.train(was_training)
    return maxima


def as_model_inputs(batch, model):
    device = next(model.parameters()).device
    if isinstance(batch, dict):
        batch = tuple(batch[name] for name in model.input_names)
    elif not isinstance(batch, (tuple, list)):
        batch = (batch,)
    return tuple(t.to(device) for t in batch)


def format_coverage(coverage: dict, on_set: dict | None = None, on_split: dict | None = None, low: float = 0.9) -> str:
    width = max([len(name) for name in coverage] + [6])
    lines = [f"{'tensor':<{width}}  coverage" + ("    set max  split max" if on_set is not None else "")]
    for name, value in coverage.items():
        flag = "  <- low" if value < low else ""
        extra = f"  {on_set.get(name, 0.0):>9.3g}  {on_split[name]:>9.3g}" if on_set is not None else ""
        lines.append(f"{name:<{width}}  {value:8.3f}{extra}{flag}")
    values = list(coverage.values())
    if values:
        lines.append(f"{len(values)} tensors: min coverage {min(values):.3f}, median {float(np.median(values)):.3f}, "
                     f"{sum(v < low for v in values)} below {low:g}")
    return "\n".join(lines)
