"""`lite3r train`: FP8-aware QAT of a Sparse-Linear-Attention student with partial attention distillation.

    teacher = dense backbone, frozen, eval, no_grad (bf16 weights on CUDA, fp32 on CPU)
    student = swap_attention(deepcopy(teacher))   SLA on the attention `sla` selects, FP8 fake quant on the linears,
                                                  everything frozen but the zero-initialised proj_l
    loss    = task loss (recon.losses: VGGT camera + depth + point, DA3 depth + camera + point)
              + lambda_kd * distill_loss(student attention outputs, teacher attention outputs) over `distill` layers

Data order is a pure function of (seed, step): sample i of step t is scene `scene_seed(seed, t, i)`, and rank r of
W takes samples [r * B/W, (r + 1) * B/W). Losses are per-sample means, so W ranks of B/W samples each give the
gradient of one process with B samples; `--resume` replays the same sequence bit for bit.

Files in --out: config.json (marks the run), checkpoints/step-NNNNNN.{safetensors,json} + checkpoints/latest.json
(trainable parameters, AdamW state, RNG states, step, loss history), and at the end student.safetensors
(proj_l tensors keyed by parameter name, the format `recon.deploy.load_proj_l` reads) + student.json (the config),
metrics.json and loss.png. Every file goes through recon.io's atomic writers.

    python -m lite3r_recon.train            # the embedded default: vggt-tiny, random teacher, synthetic scenes, CPU
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lite3r_recon.train_config import DEFAULT_RES, FAMILIES, RESUMABLE, TrainConfig, distill_select, parse_res  # noqa: F401

FORMAT = "lite3r-train/1"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 10 % at `steps` (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ---------------------------------------------------------------------------------------------------------- data
def scene_seed(seed: int, step: int, index: int, scenes: int = 0) -> int:
    """The scene of sample `index` at `step`: a pure function of (seed, step, index). With a pool of `scenes`, one of
    the pool's scenes (drawn by the same function), which are `scene_seed(seed, -2**30 - j, 0)`; negative steps
    above -2**30: the held-out eval scenes."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, step + 2**31, index]).generate_state(1)[0])
    return scene_seed(seed, -2**30 - s % scenes, 0) if scenes else s


def rank_slice(batch: int, rank: int, world: int) -> range:
    """The sample indices of the global batch that rank `rank` of `world` computes."""
    if batch % world:
        raise ValueError(f"--batch {batch} must be divisible by the number of processes ({world})")
    per = batch // world
    return range(rank * per, (rank + 1) * per)


class SceneSource:
    """Samples: dict(images [S,3,H,W] in [0,1], depth [S,H,W], mask [S,H,W] bool, extrinsics [S,3,4] w2c,
    intrinsics [S,3,3]) for a scene seed; synthetic scenes are rendered on the fly, BlendedMVS read from --data."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.cache: dict[int, dict[str, Tensor]] | None = {} if cfg.scenes else None
        self.dataset = None
        if cfg.data:
            from lite3r_recon import datasets

            self.dataset = datasets.open_dataset(cfg.dataset, cfg.data, size=cfg.res)
            if len(self.dataset) == 0:
                raise ValueError(f"--data {cfg.data}: no {cfg.dataset} scenes found")

    def sample(self, seed: int) -> dict[str, Tensor]:
        if self.cache is not None and seed in self.cache:  # a finite pool (--scenes N) is rendered / read once
            return self.cache[seed]
        out = self._sample(seed)
        if self.cache is not None:
            self.cache[seed] = out
        return out

    def _sample(self, seed: int) -> dict[str, Tensor]:
        H, W = self.cfg.res
        if self.dataset is None:
            from lite3r_recon import synthetic

            s = synthetic.render_sample(seed, views=self.cfg.views, size=(H, W))
        else:
            rng = np.random.default_rng(seed)
            s = self.dataset.sample(int(rng.integers(len(self.dataset))), views=self.cfg.views, rng=rng)
        out = {k: torch.as_tensor(s[k]) for k in ("images", "depth", "extrinsics", "intrinsics")}
        out["mask"] = torch.as_tensor(s["mask"]).bool() if "mask" in s else out["depth"] > 0
        return out

    def batch(self, seeds: list[int]) -> dict[str, Tensor]:
        samples = [self.sample(s) for s in seeds]
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# ------------------------------------------------------------------------------------------------ models
SKIP_PREFIXES = {"vggt": ("track_head.",)}  # official-file keys lite3r does not implement (VGGT's tracking head)


def dense_model(name: str, weights: str | os.PathLike | None, *, seed: int = 0) -> nn.Module:
    """Backbone `name` with the user's weights (built on the meta device, loaded strictly; the official VGGT file's
    tracking head is dropped), or random weights drawn from `seed` without touching the global RNG."""
    from lite3r_backbones import build_backbone, load_checkpoint

    if weights:
        model = build_backbone(name, device="meta")
        load_checkpoint(model, weights, strict=True, skip_prefixes=SKIP_PREFIXES.get(name.split("-")[0], ()))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_backbone(name)
    return model


def build_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The dense teacher: the user's checkpoint, or random weights drawn from `seed` (same on every rank)."""
    return dense_model(cfg.backbone, cfg.teacher, seed=cfg.seed).eval().requires_grad_(False).to(device)


def build_student(teacher: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, Any]:
    """SLA + FP8 fake-quant copy of the teacher (fp32 weights), only proj_l trainable. Returns (student, report)."""
    import lite3r
    from lite3r_recon.deploy import sla_scope_filter

    student = copy.deepcopy(teacher).float()
    report = lite3r.swap_attention(student, topk=cfg.topk, block_q=cfg.block, block_k=cfg.block,
                                   feature_map=cfg.feature_map, fp8=cfg.fp8, filter=sla_scope_filter(cfg.sla))
    student.eval()
    bad = [n for n, p in student.named_parameters() if p.requires_grad and ".proj_l." not in f".{n}"]
    if bad:
        raise RuntimeError(f"swap_attention left non-proj_l parameters trainable: {bad[:3]}")
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(f"no attention module was swapped with --sla {cfg.sla}: nothing to train")
    return student, report


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block (a module with `attn` and `mlp`) in backward instead of storing it."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for module in model.modules():
        if hasattr(module, "attn") and hasattr(module, "mlp") and not hasattr(module, "_lite3r_ckpt"):
            fwd = module.forward
            module.forward = functools.partial(checkpoint, fwd, use_reentrant=False)
            module._lite3r_ckpt = True
            n += 1
    return n


def load_student(path: str | os.PathLike, teacher: nn.Module | str, *, weights: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> nn.Module:
    """A trained student from `student.safetensors` (or the run directory holding it) and its teacher.

    `teacher`: the dense model (copied, left untouched) or a backbone name built with `weights` (random when None).
    The SLA / FP8 settings come from the student.json beside the tensors; every trained tensor must name a
    parameter of the rebuilt student with the same shape, and every proj_l of the student must be in the file."""
    from safetensors import safe_open

    from lite3r_recon.deploy import load_proj_l

    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such student file (lite3r train writes DIR/student.safetensors)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    meta_json = path.with_suffix(".json")
    if "lite3r_train" in meta:
        info = json.loads(meta["lite3r_train"])
    elif meta_json.is_file():
        info = json.loads(meta_json.read_text())
    else:
        raise ValueError(f"{path}: no training config (neither safetensors metadata nor {meta_json.name})")
    cfg = TrainConfig.from_json({**info["config"], "teacher": None, "data": None})
    if isinstance(teacher, str):
        model = dense_model(teacher, weights, seed=cfg.seed)
    else:
        model = teacher
    name = getattr(model, "name", None)
    if name and name != info["backbone"]:
        raise ValueError(f"{path} was trained on {info['backbone']}, not on {name}")
    student, _ = build_student(model, cfg)  # a copy: the teacher is left as it is
    load_proj_l(student, path)
    missing = set(trainable(student)) - set(info["params"])
    if missing:
        raise KeyError(f"{path}: no tensor for {len(missing)} proj_l parameters, first {sorted(missing)[:3]}")
    return student.requires_grad_(False).to(device or "cpu")


# ---------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str | None) -> Dist:
    """torchrun / spawn environment -> process group (nccl on CUDA, gloo on CPU) and this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda and world > 1 else (device or ("cuda" if use_cuda else "cpu")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": random.getstate()}


def _set_rng_state(tensors: dict[str, Tensor], info: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, g = info["python"]
    random.setstate((v, tuple(state), g))


class RunDir:
    """The files of one run in --out; refuses to touch an existing run unless resuming or overwriting."""

    OURS = ("config.json", "student.safetensors", "student.json", "metrics.json", "loss.png")

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.ckpt = self.out / "checkpoints"

    def exists(self) -> bool:
        return any((self.out / f).exists() for f in self.OURS) or (self.ckpt / "latest.json").exists()

    def prepare(self, *, resume: bool, overwrite: bool) -> dict | None:
        """Returns the latest checkpoint's JSON when resuming one, else None (after clearing with overwrite)."""
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} is a file, not a directory")
        if resume and (self.ckpt / "latest.json").exists():
            latest = json.loads((self.ckpt / "latest.json").read_text())
            return json.loads((self.ckpt / f"{latest['name']}.json").read_text())
        if self.exists() and not (overwrite or resume):
            raise FileExistsError(f"--out {self.out} holds a training run; pass --resume to continue it or "
                                  f"--overwrite to start over")
        if self.exists():
            for f in self.OURS:
                (self.out / f).unlink(missing_ok=True)
            if self.ckpt.is_dir():
                for f in self.ckpt.glob("step-*.*"):
                    f.unlink()
                (self.ckpt / "latest.json").unlink(missing_ok=True)
        return None

    def save(self, step: int, tensors: dict[str, Tensor], info: dict, keep: int = 2) -> None:
        from safetensors.torch import save

        from lite3r_recon.io import atomic_write_bytes, atomic_write_text

        name = f"step-{step:06d}"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.ckpt / f"{name}.safetensors",
                           save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}), overwrite=True)
        atomic_write_text(self.ckpt / f"{name}.json", json.dumps(info), overwrite=True)
        atomic_write_text(self.ckpt / "latest.json", json.dumps({"name": name, "step": step}), overwrite=True)
        for old in sorted(self.ckpt.glob("step-*.json"))[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    def load_tensors(self, info: dict) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.ckpt / f"step-{info['step']:06d}.safetensors"))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------------- the step
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class QAT:
    """Teacher, student, optimizer and the loss of one step; `step(t)` trains on step t's shard of the batch."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        import lite3r
        from lite3r_recon.losses import TASK_LOSSES, LossWeights

        self.cfg, self.d, self.lite3r = cfg, d, lite3r
        self.teacher = build_teacher(cfg, torch.device("cpu"))
        self.student, self.report = build_student(self.teacher, cfg)
        self.student.to(d.device)
        if d.device.type == "cuda":  # the frozen teacher in bf16: half the memory, bf16 compute as the student's
            self.teacher.to(d.device, torch.bfloat16)
        self.ckpt_blocks = enable_activation_checkpointing(self.student) if cfg.grad_ckpt else 0
        self.params = trainable(self.student)
        self.n_trainable = sum(p.numel() for p in self.params.values())
        self.n_total = sum(p.numel() for p in self.student.parameters())
        self.select = distill_select(cfg.distill)
        n_attn = sum(1 for m in self.student.modules() if isinstance(m, lite3r.SLAAttention) or lite3r.is_attention(m))
        if isinstance(self.select, list) and self.select[-1] >= n_attn:
            raise ValueError(f"--distill {cfg.distill}: {cfg.backbone} has {n_attn} attention modules "
                             f"(indices 0..{n_attn - 1})")
        self.task_loss = TASK_LOSSES[cfg.family]
        self.weights = LossWeights(camera=cfg.w_camera, depth=cfg.w_depth, point=cfg.w_point)
        params = list(self.params.values())
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
        with torch.no_grad(), _autocast(self.d.device), \
                self.lite3r.AttentionRecorder(self.teacher, select=self.select) as rec:
            out = self.teacher(images.to(next(self.teacher.parameters()).dtype))
        return out, [t.float() for t in rec.outputs]

    def targets(self, batch: dict[str, Tensor], t_out: dict) -> dict[str, Tensor]:
        """Task-loss targets: the normalised ground truth, or the teacher's own predictions (--target teacher)."""
        from lite3r_backbones import to_cameras
        from lite3r_recon.losses import normalize_scene, unproject_depth

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
        with torch.set_grad_enabled(grad), _autocast(self.d.device), \
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
            g["lr"] = lr_at(step, self.cfg)
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
        tensors = {f"param.{n}": p for n, p in self.params.items()}
        opt_t, groups = optimizer_tensors(self.opt)
        rng_t, rng_j = _rng_state()
        info = {"format": FORMAT, "step": step, "config": self.cfg.to_json(), "backbone": self.cfg.backbone,
                "param_groups": groups, "rng": rng_j, "history": history, **extra}
        return {**tensors, **opt_t, **rng_t}, info

    def load_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                if f"param.{n}" not in tensors:
                    raise KeyError(f"checkpoint has no tensor for {n}: it was made by another configuration")
                p.copy_(tensors[f"param.{n}"])
        load_optimizer(self.opt, tensors, info["param_groups"])
        _set_rng_state(tensors, info["rng"])

    def student_tensors(self) -> dict[str, Tensor]:
        return {n: p.detach().float().cpu().contiguous() for n, p in self.params.items()}


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
    other than 0 return the history alone). `explicit`: the config fields the user set (checked against a resumed
    run; None: all). `stop_after`: stop once that step is done, as if killed there (for tests)."""
    d = init_dist(device)
    run = RunDir(out)
    saved = run.prepare(resume=resume, overwrite=overwrite) if d.main else None
    _barrier(d)
    if not d.main and resume:
        saved = RunDir(out).prepare(resume=True, overwrite=False)
    if saved is not None:
        cfg = _resume_config(TrainConfig.from_json(saved["config"]), cfg, explicit)
    from lite3r_recon.io import console as make_console

    console = make_console(quiet or not d.main)
    qat = QAT(cfg, d)
    if d.main:
        from lite3r_recon.io import atomic_write_text

        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "config.json", json.dumps(cfg.to_json(), indent=1), overwrite=True)
    console.print(f"[bold]lite3r train[/] {cfg.backbone} on {d.device} x{d.world}: "
                  f"{qat.report.attention_swapped} attention -> SLA (topk {cfg.topk}), "
                  f"{qat.report.linear_swapped} linears FP8 fake-quant; trainable "
                  f"{qat.n_trainable:,} / {qat.n_total:,} parameters ({100 * qat.n_trainable / qat.n_total:.3f} %)"
                  + (f"; {qat.ckpt_blocks} blocks checkpointed" if qat.ckpt_blocks else ""))

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
        with _progress(console, cfg.steps, start) as (progress, task):
            for step in range(start, cfg.steps):
                terms = qat.step(step)
                history.append({"step": step + 1, **terms})
                done += 1
                vps = done * cfg.batch * cfg.views / (time.perf_counter() - t0)
                progress.update(task, advance=1, losses=_fmt_terms(terms), vps=f"{vps:.1f}")
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
    _barrier(d)
    return summary


def _resume_config(saved: TrainConfig, asked: TrainConfig, explicit: set[str] | None) -> TrainConfig:
    """On --resume the saved config wins; of the fields set explicitly (`explicit`; None: every field), only
    `RESUMABLE` ones may differ from the saved run (e.g. --steps to extend it)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    explicit = set(names) if explicit is None else set(explicit)
    diff = [n for n in names if n in explicit and n not in RESUMABLE and getattr(saved, n) != getattr(asked, n)]
    if diff:
        raise ValueError(f"--resume: the run in --out was made with other settings ({', '.join(diff)}); only "
                         f"{', '.join('--' + r.replace('_', '-') for r in RESUMABLE)} may change")
    return dataclasses.replace(saved, **{r: getattr(asked, r) for r in RESUMABLE if r in explicit})


def _finish(qat: QAT, cfg: TrainConfig, run: RunDir, history: list[dict], init_metrics: dict,
            eval_batches: list, console, extra: dict) -> dict:
    from safetensors.torch import save

    from lite3r_recon.io import atomic_write_bytes, atomic_write_text

    info = {"format": FORMAT, "backbone": cfg.backbone, "config": cfg.to_json(), "step": cfg.steps,
            "params": sorted(qat.params), "teacher": cfg.teacher}
    atomic_write_bytes(run.out / "student.safetensors",
                       save(qat.student_tensors(), metadata={"lite3r_train": json.dumps(info)}), overwrite=True)
    atomic_write_text(run.out / "student.json", json.dumps(info, indent=1), overwrite=True)
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
def _fmt_terms(terms: dict[str, float]) -> str:
    keys = [k for k in ("loss", "task", "kd", "camera", "depth", "point") if k in terms]
    return " ".join(f"{k} {terms[k]:.4g}" for k in keys)


class _progress:
    def __init__(self, console, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[losses]}"), TextColumn("{task.fields[vps]} views/s"),
                          TimeRemainingColumn(), console=console, transient=False, disable=console.quiet)
        self.task = self.p.add_task("train", total=total, completed=start, losses="", vps="-")

    def __enter__(self):
        self.p.__enter__()
        return self.p, self.task

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    for k in ("loss", "task"):
        ax[0].plot(steps, [h[k] for h in history], label=k)
    ax[0].set_title("total and task loss")
    ax[1].plot(steps, [h["kd"] for h in history], color="C3")
    ax[1].set_yscale("log")
    ax[1].set_title(f"attention distillation ({cfg.distill})")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax[0].legend()
    fig.suptitle(f"lite3r train {cfg.backbone}: SLA topk {cfg.topk}, FP8 {'on' if cfg.fp8 else 'off'}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    train(TrainConfig(), "runs/default", overwrite=True)
