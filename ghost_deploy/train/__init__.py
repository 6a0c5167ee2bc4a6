"""Training stage: the teacher and GHOST loops, detection loss, OST/SCM distillation, DDP, the ablation."""
