"""Run the training stages: the teacher into `out/teacher`, GHOST into `out/ghost`, on one process or DDP ranks."""
from __future__ import annotations

from pathlib import Path

from ghost_deploy.errors import UserError
from ghost_deploy.io import write_json_atomic
from ghost_deploy.train.distributed import check_ranks_agree, init_from_env, launch
from ghost_deploy.train.loop import train_ghost, train_teacher


def run_training(recipe: dict, out: Path, stage: str = "all", data=None, teacher=None, bit_plan=None, epochs=None,
                 device=None, resume=False, strict=False, nproc=1, progress=True, log=print, force=False) -> dict:
    """Teacher into `out/teacher`, GHOST into `out/ghost`; returns the checkpoint paths."""
    if resume and not any((out / name / "train_state.safetensors").is_file() for name in ("teacher", "ghost")):
        raise UserError(out, "--resume: no run to continue here (no teacher/ or ghost/ train_state.safetensors)")
    if nproc > 1:
        return launch(run_training, nproc, recipe, out, stage=stage, data=data, teacher=teacher, bit_plan=bit_plan, epochs=epochs,
                      resume=resume, strict=strict, force=force)
    rank, world_size, ddp_device = init_from_env()
    if world_size > 1:
        device = ddp_device
    ranked = {"rank": rank, "world_size": world_size}
    results: dict = {}
    if stage in ("teacher", "all") and teacher is None:
        results["teacher"] = train_teacher(recipe, out / "teacher", data=data, device=device,
                                           resume=resume and (out / "teacher" / "train_state.safetensors").exists(),
                                           progress=progress, strict=strict, epochs=epochs, log=log, overwrite=force, **ranked)
        teacher = results["teacher"]["best"]
        log(f"teacher: best mAP50 {results['teacher']['best_fitness']:.4f} -> {teacher}{_skipped_note(results['teacher'])}")
    if stage in ("ghost", "all"):
        if teacher is None:
            raise UserError("--teacher", "the ghost stage needs a teacher checkpoint (--teacher CKPT) or --stage all")
        results["ghost"] = train_ghost(recipe, out / "ghost", teacher, data=data, bit_plan_path=bit_plan, device=device,
                                       resume=resume and (out / "ghost" / "train_state.safetensors").exists(),
                                       progress=progress, strict=strict, epochs=epochs, log=log, overwrite=force, **ranked)
        log(f"ghost: best mAP50 {results['ghost']['best_fitness']:.4f} -> {results['ghost']['best']}{_skipped_note(results['ghost'])}")
    if world_size > 1:
        _record_ddp_agreement(results, out, rank, log)
    return results


def _skipped_note(result: dict) -> str:
    count = result.get("skipped", 0)
    return f" (skipped {count} bad sample{'s' if count != 1 else ''}; --strict makes them errors)" if count else ""


def _record_ddp_agreement(results: dict, out: Path, rank: int, log) -> None:
    """Every rank must end with the same weights; rank 0 writes the evidence to out/ddp.json."""
    final = results.get("ghost") or results.get("teacher")
    agreement = check_ranks_agree(final["model"])
    if rank == 0:
        write_json_atomic(out / "ddp.json", agreement)
        log(f"DDP: {agreement['world_size']} ranks, identical weights: {agreement['identical']}")
