"""Cost of one GHOST QAT step (fake-quant student + frozen teacher + OST/SCM) vs one FP32 teacher step.

Same batch, same model config, the demo recipe's settings; the two kinds of step are interleaved so
machine drift hits both alike. Prints the median of each and the ratio.

    python benchmarks/step_cost.py [--recipe demo] [--steps 20] [--teacher CKPT]
"""
import argparse
import statistics
import time

import torch

from ghost_deploy.train.distill import SelfTeaching
from ghost_deploy.train.loss import DetectionLoss
from ghost_deploy.model import build_model
from ghost_deploy.quant import calibrate_activations, hq_plan, quantize_model
from ghost_deploy.recipe import load_recipe
from ghost_deploy.train.loop import GhostForward, TeacherForward, _ghost_step, _teacher_step, load_data, make_loader
from ghost_deploy.train.distill import OpenRateLog
from ghost_deploy.eval.val import batch_inputs

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="demo")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()
recipe = load_recipe(args.recipe)
data = load_data(recipe, None)
batch = next(iter(make_loader(data.train, recipe["ghost"]["batch_size"], True, 0)))
nc = data.spec.nc

teacher = build_model(recipe["model"], nc=nc, input_mode=recipe["input_mode"])
inputs = batch_inputs(batch, teacher.input_names)
teacher_loss = DetectionLoss(teacher.detect, recipe["hyp"], img_size=recipe["img_size"])
teacher_opt = torch.optim.SGD(teacher.parameters(), lr=1e-4, momentum=0.9)
teacher_step = _teacher_step(teacher_loss, 0.0, teacher.input_names)
teacher_module = TeacherForward(teacher).train()

student = build_model(recipe["model"], nc=nc, input_mode=recipe["input_mode"])
student.load_state_dict(teacher.state_dict())
plan_cfg = recipe["ghost"]["plan"]
plan = hq_plan(student, threshold=plan_cfg["threshold"], img_size=recipe["img_size"])
quantize_model(student, plan)
calibrate_activations(student, [inputs])
if not recipe["ghost"]["learn_act_scales"]:  # as train_ghost
    from ghost_deploy.quant import act_quantizers

    for quantizer in act_quantizers(student).values():
        quantizer.scale.requires_grad_(False)
from ghost_deploy.quant import fold_bn

frozen = fold_bn(build_model(recipe["model"], nc=nc, input_mode=recipe["input_mode"]).eval()).eval()  # as train_ghost
with torch.no_grad():
    channels = [f.shape[1] for f in frozen.forward_features(*inputs)[1]]
distill_cfg = recipe["ghost"]["distill"]
distiller = SelfTeaching(channels, channels, qk_dim=distill_cfg["qk_dim"], layer_norm=distill_cfg["layer_norm"])
ghost_module = GhostForward(student, distiller).train()
student_loss = DetectionLoss(student.detect, recipe["hyp"], img_size=recipe["img_size"])
ghost_opt = torch.optim.SGD(list(student.parameters()) + list(distiller.parameters()), lr=1e-4, momentum=0.9)
ghost_step = _ghost_step(frozen, student_loss, distill_cfg, OpenRateLog())


def timed(module, step, optimizer):
    started = time.perf_counter()
    loss, _ = step(module, batch, inputs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


for _ in range(3):  # warm-up
    timed(teacher_module, teacher_step, teacher_opt)
    timed(ghost_module, ghost_step, ghost_opt)
teacher_times, ghost_times = [], []
for _ in range(args.steps):
    teacher_times.append(timed(teacher_module, teacher_step, teacher_opt))
    ghost_times.append(timed(ghost_module, ghost_step, ghost_opt))
t, g = statistics.median(teacher_times), statistics.median(ghost_times)
print(f"model {recipe['model']} at {recipe['img_size']} px, batch {len(batch['paths'])}, torch threads {torch.get_num_threads()}")
print(f"teacher step: median {1000 * t:.1f} ms   GHOST step: median {1000 * g:.1f} ms   ratio {g / t:.2f}x")
