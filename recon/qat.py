"""The engine of `lite3r train` (and of `lite3r study`'s trained rows): FP8-aware QAT of a Sparse-Linear-Attention student with partial attention distillation.

    teacher = dense backbone, frozen, eval, no_grad (bf16 weights on CUDA, fp32 on CPU)
    student = models.make_student(teacher, cfg.sla_config())   SLA on the attention `sla` selects, FP8 fake quant
                                                  on the linears, everything frozen but the zero-initialised proj_l
    loss    = task loss (lite3r_recon.losses: VGGT camera + depth + point, DA3 depth + camera + point)
              + lambda_kd * distill_loss(student attention outputs, teacher attention outputs) over `distill` layers

Data order, checkpoints, resume and DDP are lite3r_recon.runs' (shared with `lite3r pretrain`); models are built
and the student saved by lite3r_recon.models.

Files in --out: config.json (marks the run), checkpoints/step-NNNNNN.{safetensors,json} + checkpoints/latest.json
(trainable parameters, AdamW state, RNG states, step, loss history), and at the end student.safetensors
(proj_l tensors keyed by parameter name, the format `lite3r_recon.models.load_student` reads) + student.json (the config),
metrics.json and loss.png. Every file goes through lite3r_recon.io's atomic writers.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from lite3r_recon import models
from lite3r_recon.runs import (Dist, RunDir, SceneSource, autocast, barrier, fmt_terms, init_dist,
                               load_training_state, loss_plot, lr_at, progress, rank_slice, resume_config, scene_seed,
                               training_state)
from lite3r_recon.train_config import RESUMABLE, TrainConfig, distill_select
from lite3r_recon.errors import InvalidInput

FORMAT = models.STUDENT_FORMAT
STUDENT_FILES = ("student.safetensors", "student.json")


# ------------------------------------------------------------------------------------------------ models
def build_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The dense teacher: the user's checkpoint, or random weights drawn from `seed` (same on every rank)."""
    return models.dense_model(cfg.backbone, cfg.teacher, seed=cfg.seed).to(device)


def build_student(teacher: nn.Module, cfg: TrainConfig) -> nn.Module:
    """SLA + FP8 fake-quant copy of the teacher in fp32, only proj_l trainable (models.make_student); with
    --trainable attention the SLA layers' own weights too (models.unfreeze_sla)."""
    student = models.make_student(teacher, cfg.sla_config(), fp8=cfg.fp8).float().eval()
    if cfg.trainable == "attention":
        models.unfreeze_sla(student)
    return student


# --------------------------------------------------------------------------------------------------- the step
class QAT:
    """Teacher, student, optimizer and the loss of one step; `step(t)` trains on step t's shard of the batch."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        import lite3r
        from lite3r_recon.losses import TASK_LOSSES, LossWeights

        self.cfg, self.d, self.lite3r = cfg, d, lite3r
        self.teacher = build_teacher(cfg, torch.device("cpu"))
        self.student = build_student(self.teacher, cfg)
        self.report = self.student.lite3r_report
        self.student.to(d.device)
        if d.device.type == "cuda":  # the frozen teacher in bf16: half the memory, bf16 compute as the student's
            self.teacher.to(d.device, torch.bfloat16)
        self.ckpt_blocks = models.enable_activation_checkpointing(self.student) if cfg.grad_ckpt else 0
        self.params = models.trainable(self.student)
        self.n_trainable = sum(p.numel() for p in self.params.values())
        self.n_total = sum(p.numel() for p in self.student.parameters())
        self.select = distill_select(cfg.distill)
        n_attn = sum(1 for m in self.student.modules() if isinstance(m, lite3r.SLAAttention) or lite3r.is_attention(m))
        if isinstance(self.select, list) and self.select[-1] >= n_attn:
            raise InvalidInput(f"--distill {cfg.distill}: {cfg.backbone} has {n_attn} attention modules "
                             f"(indices 0..{n_attn - 1})")
        self.task_loss = TASK_LOSSES[cfg.family]
        self.weights = LossWeights(camera=cfg.w_camera, depth=cfg.w_depth, point=cfg.w_point)
        # proj_l at --lr; inherited weights (--trainable attention) at --lr-inherited: the schedule scales both
        new = [p for n, p in self.params.items() if models.is_proj_l(n)]
        old = [p for n, p in self.params.items() if not models.is_proj_l(n)]
        params = [{"params": new, "lr_scale": 1.0}] + ([{"params": old, "lr_scale": cfg.lr_inherited / cfg.lr}]
                                                        if old else [])
        self.opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
                    if cfg.optimizer == "adamw" else
                    torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay))
        self.forward_student: Callable = self.student
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [n for n, p in self.student.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.student.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.student, frozen)
            with warnings.catch_warnings():  # broadcast_buffers: no buffers are synced (the student has none that change)
                warnings.simplefilter("ignore", FutureWarning)
                self.forward_student = DDP(self.student, device_ids=[d.device] if d.device.type == "cuda" else None,
                                           broadcast_buffers=False)
        self.data = SceneSource(cfg)

    def local_batch(self, step: int) -> dict[str, Tensor]:
        seeds = [scene_seed(self.cfg.seed, step, i, self.cfg.scenes)
                 for i in rank_slice(self.cfg.batch, self.d.rank, self.d.world)]
        return {k: v.to(self.d.device) for k, v in self.data.batch(seeds).items()}

    def teacher_forward(self, images: Tensor) -> tuple[dict, list[Tensor]]:
        with torch.no_grad(), autocast(self.d.device), \
                self.lite3r.AttentionRecorder(self.teacher, select=self.select) as rec:
            out = self.teacher(images.to(next(self.teacher.parameters()).dtype))
        return out, [t.float() for t in rec.outputs]

    def targets(self, batch: dict[str, Tensor], t_out: dict) -> dict[str, Tensor]:
        """Task-loss targets: the normalised ground truth, or the teacher's own predictions (--target teacher)."""
        from lite3r_backbones import to_cameras
        from lite3r_backbones.cameras import normalize_scene, unproject_depth

        if self.cfg.target == "gt":
            return normalize_scene(batch["extrinsics"], batch["intrinsics"], batch["depth"], batch["mask"])
        t = _to_float(t_out)
        cams = to_cameras(self.teacher, t, tuple(batch["images"].shape[-2:]))
        gt = {k: cams[k].float() for k in ("extrinsics", "intrinsics", "depth")}
        gt["world_points"] = t["world_points"] if "world_points" in t else unproject_depth(
            gt["depth"], gt["extrinsics"], gt["intrinsics"])
        if "pose_enc" in t:
            gt["pose_enc"] = t["pose_enc"]
        gt["mask"] = torch.isfinite(gt["depth"]) & (gt["depth"] > 0)
        return gt

    def distill(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """lite3r.distill_loss; with kd_norm, each module's outputs divided by the teacher's RMS (relative MSE)."""
        if len(student) != len(teacher) or not student:
            raise RuntimeError(f"distillation matched {len(student)} student and {len(teacher)} teacher attention "
                               f"outputs (--distill {self.cfg.distill})")
        student = [s.float() for s in student]
        if self.cfg.kd_norm:  # per leading index (sample or frame), so a batch split over ranks changes nothing
            rms = [t.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12).reshape((-1,) + (1,) * (t.dim() - 1))
                   for t in teacher]
            student = [s / r for s, r in zip(student, rms)]
            teacher = [t / r for t, r in zip(teacher, rms)]
        return self.lite3r.distill_loss(student, teacher)

    def losses(self, batch: dict[str, Tensor], *, grad: bool = True) -> tuple[Tensor, dict[str, float], dict, dict]:
        """(loss, float terms, student outputs, teacher outputs) on a batch."""
        t_out, t_att = self.teacher_forward(batch["images"])
        gt = self.targets(batch, t_out)
        with torch.set_grad_enabled(grad), autocast(self.d.device), \
                self.lite3r.AttentionRecorder(self.student, select=self.select) as rec:
            out = (self.forward_student if grad else self.student)(batch["images"])
            task = self.task_loss(out, gt, self.weights)
            kd = self.distill(rec.outputs, t_att)
            loss = task["task"] + self.cfg.lambda_kd * kd
        terms = {"loss": loss.item(), "task": task["task"].item(), "kd": kd.item()}
        terms.update({k: v.item() for k, v in task.items() if k in ("camera", "depth", "point")})
        return loss, terms, out, t_out

    def step(self, step: int) -> dict[str, float]:
        return self.train_on(self.local_batch(step), step)

    def train_on(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """One optimizer step on this rank's `batch` (gradients averaged over ranks by DDP)."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.cfg) * g.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        loss, terms, _, _ = self.losses(batch)
        loss.backward()
        if self.cfg.grad_clip > 0:
            terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip))
        self.opt.step()
        terms["lr"] = lr_at(step, self.cfg)
        if self.d.world > 1:  # report the global-batch losses: the mean over ranks
            t = torch.tensor([terms[k] for k in sorted(terms)], dtype=torch.float64, device=self.d.device)
            torch.distributed.all_reduce(t)
            terms = {k: float(v) / self.d.world for k, v in zip(sorted(terms), t.tolist())}
        return terms

    # ---- state
    def state(self, step: int, history: list[dict], extra: dict) -> tuple[dict[str, Tensor], dict]:
        tensors, resume = training_state(self.params, self.opt)
        info = {"format": FORMAT, "step": step, "config": self.cfg.to_json(), "backbone": self.cfg.backbone,
                **resume, "history": history, **extra}
        return tensors, info

    def load_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        load_training_state(self.params, self.opt, tensors, info)


# ----------------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(qat: QAT, batches: list[dict[str, Tensor]], *, student: bool = True) -> dict[str, dict[str, float]]:
    """Geometry metrics vs ground truth of the teacher (student=False) or the student, plus the student's
    agreement with the teacher (attention distillation loss, depth relative difference)."""
    from lite3r_backbones import to_cameras
    from lite3r_recon import metrics

    rows: list[dict[str, float]] = []
    for batch in batches:
        images = batch["images"]
        hw = tuple(images.shape[-2:])
        if student:
            _, terms, model_out, t_out = qat.losses(batch, grad=False)
            model = qat.student
        else:
            (model_out, _), model, terms = qat.teacher_forward(images), qat.teacher, {}
        cams = to_cameras(model, _to_float(model_out), hw)
        row = metrics.summarize(cams, batch)
        if student:
            t_cams = to_cameras(qat.teacher, _to_float(t_out), hw)
            d_t, d_s = t_cams["depth"].float(), cams["depth"].float()
            row["depth_vs_teacher"] = float(((d_s - d_t).norm() / d_t.norm().clamp_min(1e-12)))
            row["kd"] = terms["kd"]
            row["task"] = terms["task"]
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _to_float(out: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------ main
def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          device: str | None = None, quiet: bool = False, explicit: set[str] | None = None,
          stop_after: int | None = None) -> dict:
    """Run (or resume) a training run; returns the summary written to metrics.json (with the loss history; ranks
    other than 0 return the history alone). `resume`: go on with the run in `out` (runs.resume_config: its saved
    config; from step 0 when it has no checkpoint yet; an error when there is no run). `explicit`: the config fields
    the user set (checked against a resumed run; None: all). `stop_after`: stop once that step is done, as if killed there (for tests)."""
    d = init_dist(device)
    run = RunDir(out, files=STUDENT_FILES)
    asked, saved = cfg, None
    if d.main:
        cfg, saved = resume_config(run, asked, resume=resume, overwrite=overwrite, explicit=explicit,
                                   resumable=RESUMABLE)
    barrier(d)
    if not d.main and resume:  # once rank 0 has checked the run, the same saved config and checkpoint
        cfg, saved = resume_config(run, asked, resume=True, overwrite=False, explicit=explicit, resumable=RESUMABLE)
    from lite3r_recon.io import console as make_console

    console = make_console(quiet or not d.main)
    qat = QAT(cfg, d)
    if d.main:
        from lite3r_recon.io import atomic_write_text

        atomic_write_text(run.out / "config.json", json.dumps(cfg.to_json(), indent=1), overwrite=True)
    console.print(f"[bold]lite3r train[/] {cfg.backbone} on {d.device} x{d.world}: "
                  f"{qat.report.attention_swapped} attention -> SLA (topk {cfg.topk}), "
                  f"{qat.report.linear_swapped} linears FP8 fake-quant; trainable "
                  f"{qat.n_trainable:,} / {qat.n_total:,} parameters ({100 * qat.n_trainable / qat.n_total:.3f} %)"
                  + (f"; {qat.ckpt_blocks} blocks checkpointed" if qat.ckpt_blocks else ""))
    note = models.weights_note(cfg.backbone, cfg.teacher, flag="--teacher")
    if note:
        console.print(f"[yellow]{note}[/]")

    eval_batches = [qat.data.batch([scene_seed(cfg.seed, -1 - i, 0)]) for i in range(cfg.eval_scenes)]
    eval_batches = [{k: v.to(d.device) for k, v in b.items()} for b in eval_batches]
    history: list[dict] = []
    start, init_metrics = 0, {}
    if saved is not None:
        qat.load_state(run.load_tensors(saved), saved)
        history, start = saved["history"], saved["step"]
        init_metrics = saved.get("init_metrics", {})
        console.print(f"resumed {run.out} at step {start}")
    elif d.main and cfg.eval_scenes:
        init_metrics = {"teacher": evaluate(qat, eval_batches, student=False),
                        "student_init": evaluate(qat, eval_batches)}

    def checkpoint(step: int) -> None:
        tensors, info = qat.state(step, history, {"init_metrics": init_metrics})
        if d.main:
            run.save(step, tensors, info)

    t0, done, saved_at = time.perf_counter(), 0, start
    try:
        with progress(console, cfg.steps, start) as (bar, task):
            for step in range(start, cfg.steps):
                terms = qat.step(step)
                history.append({"step": step + 1, **terms})
                done += 1
                vps = done * cfg.batch * cfg.views / (time.perf_counter() - t0)
                bar.update(task, advance=1, losses=fmt_terms(terms, LOSS_TERMS), vps=f"{vps:.1f}")
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                    checkpoint(step + 1)
                    saved_at = step + 1
                if stop_after is not None and step + 1 >= stop_after:
                    return {"stopped_at": step + 1, "history": history}
    except KeyboardInterrupt:  # Ctrl-C: keep what is done (a kill -9 resumes from the last periodic checkpoint)
        if history and history[-1]["step"] > saved_at:
            checkpoint(history[-1]["step"])
        console.print(f"interrupted; checkpoint at step {history[-1]['step'] if history else start} in {run.ckpt} "
                      f"(continue with --resume)")
        raise
    extra = {"world_size": d.world}
    if d.world > 1:  # DDP keeps the replicas identical; check it (the max |difference| to rank 0, over all ranks)
        flat = torch.cat([p.detach().float().flatten() for p in qat.params.values()])
        ref = flat.clone()
        torch.distributed.broadcast(ref, 0)
        diff = (flat - ref).abs().max().reshape(1)
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        extra["ddp_max_rank_diff"] = float(diff)
    summary = (_finish(qat, cfg, run, history, init_metrics, eval_batches, console, extra) if d.main
               else {"history": history, **extra})
    barrier(d)
    return summary


def _finish(qat: QAT, cfg: TrainConfig, run: RunDir, history: list[dict], init_metrics: dict,
            eval_batches: list, console, extra: dict) -> dict:
    from lite3r_recon.io import atomic_write_bytes, atomic_write_text

    models.save_student(qat.student, run.out / "student.safetensors",
                        {"backbone": cfg.backbone, "config": cfg.to_json(), "step": cfg.steps, "teacher": cfg.teacher})
    final = evaluate(qat, eval_batches) if cfg.eval_scenes else {}
    metrics = {**init_metrics, "student": final}
    last = history[-1] if history else {}
    first = history[0] if history else {}
    summary = {"backbone": cfg.backbone, "config": cfg.to_json(), "steps": cfg.steps,
               "trainable_params": qat.n_trainable, "total_params": qat.n_total,
               "final_losses": {k: v for k, v in last.items() if k != "step"},
               "first_losses": {k: v for k, v in first.items() if k != "step"},
               "metrics": metrics, **extra, "files": {"student": "student.safetensors", "config": "student.json",
                                             "plot": "loss.png"}}
    atomic_write_text(run.out / "metrics.json", json.dumps(summary, indent=1), overwrite=True)
    atomic_write_bytes(run.out / "loss.png", _loss_plot(history, cfg), overwrite=True)
    console.print(_table(metrics, summary))
    console.print(f"wrote {run.out}/student.safetensors (+ student.json), metrics.json, loss.png")
    summary["history"] = history
    return summary


# -------------------------------------------------------------------------------------------- presentation
LOSS_TERMS = ("loss", "task", "kd", "camera", "depth", "point")


TABLE_METRICS = ("abs_rel", "delta1", "auc30", "auc5", "rot_err", "trans_err", "depth_vs_teacher", "kd", "task")


def _table(metrics: dict, summary: dict):
    from rich.table import Table

    cols = [c for c in ("teacher", "student_init", "student") if c in metrics]
    table = Table(title=f"{summary['backbone']}: teacher vs student ({summary['trainable_params']:,} trainable / "
                        f"{summary['total_params']:,} parameters)")
    table.add_column("metric")
    for c in cols:
        table.add_column(c.replace("_init", " (init)"), justify="right")
    keys = [k for k in TABLE_METRICS if any(k in metrics[c] for c in cols)]  # all of them are in metrics.json
    for k in keys:
        table.add_row(k, *[f"{metrics[c][k]:.4g}" if k in metrics[c] else "-" for c in cols])
    return table


def _loss_plot(history: list[dict], cfg: TrainConfig) -> bytes:
    return loss_plot(history, [("total and task loss", ("loss", "task"), False),
                               (f"attention distillation ({cfg.distill})", ("kd",), True)],
                     f"lite3r train {cfg.backbone}: SLA topk {cfg.topk}, FP8 {'on' if cfg.fp8 else 'off'}")

