"""`lite3r pretrain`: a dense teacher (VGGT or DA3) trained from scratch with its own task loss on synthetic scenes.

    model = build_backbone(f"{family}-{size}", weights="random")   # drawn from --seed (or --init's weights)
    loss  = TASK_LOSSES[family](model(images), normalize_scene(ground truth))   (recon.losses)

Every sample is a new procedural scene (recon.synthetic), rendered on the training device a batch at a time: sample
i of step t is scene `train_seed(seed, t, i)` < 2**31; the held-out scenes are seeds 2**31 + k, so no training scene
is ever an eval scene. Data order is a pure function of (seed, step) and the run directory keeps parameters, AdamW
and RNG state (lite3r_recon.runs), so `--resume` after a kill replays the same run bit for bit.

Files in --out: config.json, checkpoints/ (fp32 parameters + optimizer + RNG state), and at the end
teacher.safetensors (fp16 weights, the format shipped in backbones/weights/) + teacher.json (config, command,
metrics), metrics.json (held-out metrics before and after, loss history), loss.png and heldout.png (held-out AUC@30 /
AbsRel over training). The held-out metrics at the end are measured on the fp16-rounded weights: the file's own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import torch
from torch import Tensor, nn

from lite3r_recon.errors import InvalidInput
from lite3r_recon.runs import (RunDir, autocast, fmt_terms, init_dist, load_training_state, loss_plot, lr_at, progress,
                               resume_config, scene_seed, training_state)
from lite3r_recon.scoring import HELDOUT, heldout_data, heldout_metrics
from lite3r_recon.synthetic import ARC, SKIES
from lite3r_recon.train_config import LossWeights

FORMAT = "lite3r-pretrain/1"
SIZES = ("tiny", "small")
DEFAULT_RES = {"tiny": (126, 168), "small": (252, 252)}
RESUMABLE = ("steps", "ckpt_every", "eval_scenes", "eval_every")
FILES = ("teacher.safetensors", "teacher.json", "heldout.png")
MAX_SKIPPED = 20
SHOW = ("abs_rel", "delta1", "auc30", "auc5", "rra5", "rta5", "chamfer", "fscore")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run; saved with every checkpoint."""

    family: str = "vggt"  # vggt | da3
    size: str = "tiny"  # tiny | small
    steps: int = 2000
    batch: int = 16  # scenes per step
    views: int = 4
    res: tuple[int, int] | None = None  # (H, W), multiples of 14; default 126x168 tiny, 252x252 small
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    arc: tuple[float, float] = ARC  # degrees the cameras of a training scene span; held-out scenes keep ARC
    sky: str = "plain"  # the training scenes' sky (recon.synthetic.SKIES); held-out scenes keep the default
    fov_init: float = 1.0  # VGGT: the camera head starts predicting this field of view (radians; 0: the plain init)
    w_camera: float = LossWeights.camera
    w_depth: float = LossWeights.depth
    w_point: float = LossWeights.point
    w_track: float = 0.0  # VGGT: the tracking loss (a correspondence signal: exact tracks of frame-0 pixels)
    track_points: int = 64  # query pixels of frame 0 per scene for the tracking loss
    seed: int = 0
    ckpt_every: int = 250
    eval_every: int = 250  # held-out AUC@30 / AbsRel on a few scenes every N steps (the curve in heldout.png)
    eval_scenes: int = 16  # held-out scenes of the final metrics
    init: str | None = None  # start from these weights (a teacher.safetensors, or "shipped") instead of a random draw

    def __post_init__(self):
        if self.family not in ("vggt", "da3"):
            raise InvalidInput(f"pretrain: the family must be vggt or da3, got {self.family!r}")
        if self.size not in SIZES:
            raise InvalidInput(f"--size must be tiny or small, got {self.size!r}")
        res = tuple(self.res) if self.res else DEFAULT_RES[self.size]
        if len(res) != 2 or any(int(r) <= 0 or int(r) % 14 for r in res):
            raise InvalidInput(f"--res must be H,W or one size, positive multiples of the patch size 14; got {self.res}")
        object.__setattr__(self, "res", (int(res[0]), int(res[1])))
        arc = tuple(float(a) for a in self.arc)
        if len(arc) != 2 or not 0 <= arc[0] <= arc[1] <= 360:
            raise InvalidInput(f"--arc must be MIN,MAX degrees with 0 <= MIN <= MAX <= 360, got {self.arc}")
        object.__setattr__(self, "arc", arc)
        if self.sky not in SKIES:
            raise InvalidInput(f"--sky must be one of {', '.join(SKIES)}, got {self.sky!r}")
        if not (0 <= self.fov_init < 3 and math.isfinite(self.fov_init)):
            raise InvalidInput(f"--fov-init must be a field of view in radians in [0, 3), got {self.fov_init}")
        for name in ("steps", "batch", "ckpt_every", "eval_every"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.views < 2:
            raise InvalidInput(f"--views must be at least 2 (the camera loss is relative to view 0), got {self.views}")
        if self.warmup < 0 or self.eval_scenes < 0:
            raise InvalidInput("--warmup and --eval-scenes must be non-negative")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInput(f"--lr must be positive, got {self.lr}")
        if self.w_track and self.family != "vggt":
            raise InvalidInput("--w-track: only VGGT has a tracking head")
        if self.track_points < 1:
            raise InvalidInput(f"--track-points must be at least 1, got {self.track_points}")
        if min(self.w_camera, self.w_depth, self.w_point, self.w_track, self.weight_decay) < 0:
            raise InvalidInput("the task loss weights and --weight-decay must be non-negative")
        if self.init == "shipped":
            from lite3r_backbones import shipped_weights

            if shipped_weights(self.backbone) is None:
                raise InvalidInput(f"--init shipped: {self.backbone} has no shipped weights (pass a teacher.safetensors)")
        elif self.init is not None and not os.path.isfile(self.init):
            raise InvalidInput(f"--init {self.init}: no such file (a teacher.safetensors, or 'shipped')")

    @property
    def backbone(self) -> str:
        return f"{self.family}-{self.size}"

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k in ("res", "arc") and v else v) for k, v in d.items() if k in known})


def train_seed(seed: int, step: int, index: int) -> int:
    """The training scene of sample `index` at `step` (below HELDOUT: never a held-out scene)."""
    return scene_seed(seed, step, index) % HELDOUT


def initial_model(cfg: PretrainConfig, **overrides) -> nn.Module:
    """The model a run starts from: `cfg.init`'s weights loaded strictly (a teacher trained on, e.g. the shipped one
    continued after a session's device time ran out: a fresh AdamW and schedule, so give it a new --seed for new
    scenes), or a random draw from `cfg.seed`."""
    if cfg.init is None:
        return random_model(cfg.backbone, cfg.seed, fov_init=cfg.fov_init, **overrides)
    from lite3r_backbones import build_backbone

    # "shipped": the file itself, loaded strictly (an override that changes the architecture fails)
    return build_backbone(cfg.backbone, weights=cfg.init, **overrides)


def random_model(name: str, seed: int, *, fov_init: float = 0.0, **overrides) -> nn.Module:
    """Backbone `name` randomly initialised from `seed` without touching the global RNG. `fov_init` > 0 (VGGT): the
    camera head's field-of-view outputs start there. They leave the head through a ReLU (as in the official VGGT), and
    from a zero-mean init half of them start at or below 0 and never get a gradient again: the first tiny teacher's
    fov_w unit died that way. The head adds its 4 refinement steps' outputs, so each step's bias gets a quarter."""
    from lite3r_backbones import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(name, weights="random", **overrides)
    head = getattr(model, "camera_head", None)
    if fov_init > 0 and head is not None and hasattr(head, "pose_branch"):
        with torch.no_grad():
            head.pose_branch.fc2.bias[7:9] = fov_init / 4
    return model


class Pretrainer:
    """Model, optimizer and one training step on step t's scenes."""

    def __init__(self, cfg: PretrainConfig, device: torch.device):
        from lite3r_recon.losses import TASK_LOSSES

        self.cfg, self.device = cfg, device
        # DA3 in training takes view 0 as its reference: the loss puts the world in view 0 (relative poses, and so
        # the metrics, do not depend on which view the reference is at inference)
        extra = {"ref_view_strategy": "first"} if cfg.family == "da3" else {}
        if cfg.w_track:
            extra["enable_track"] = True  # vggt-small is built without its tracking head otherwise
        # the heads over all frames at once: fewer kernel launches (a tiny teacher's step is launch-bound)
        self.model = initial_model(cfg, frames_chunk_size=None, **extra).to(device).train()
        self.skipped = 0  # consecutive steps skipped for a non-finite loss or gradient
        self.params = dict(self.model.named_parameters())
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95), eps=1e-8)
        self.loss_fn = TASK_LOSSES[cfg.family]
        self.weights = LossWeights(camera=cfg.w_camera, depth=cfg.w_depth, point=cfg.w_point, track=cfg.w_track)

    def batch(self, step: int) -> dict[str, Tensor]:
        from lite3r_recon.synthetic import render_batch

        seeds = [train_seed(self.cfg.seed, step, i) for i in range(self.cfg.batch)]
        return render_batch(seeds, self.cfg.views, self.cfg.res, device=self.device, arc=self.cfg.arc,
                            sky=self.cfg.sky)

    def step(self, step: int) -> dict[str, float]:
        from lite3r_backbones.cameras import normalize_scene, project_tracks

        b = self.batch(step)
        gt = normalize_scene(b["extrinsics"], b["intrinsics"], b["depth"], b["mask"])
        query = None
        if self.cfg.w_track:
            query = self.track_queries(step, gt["mask"][:, 0])
            gt["tracks"], gt["track_vis"] = project_tracks(query, gt["world_points"], gt["depth"], gt["extrinsics"],
                                                           gt["intrinsics"], gt["mask"])
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device):
            out = self.model(b["images"]) if query is None else self.model(b["images"], query_points=query)  # DA3: none
            terms = self.loss_fn(out, gt, self.weights)
        loss = terms["task"]
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        ok = bool(torch.isfinite(loss) & torch.isfinite(gnorm))
        if ok:
            self.opt.step()
            self.skipped = 0
        else:  # an overflow on one batch skips that update (the same on a replay: data and state decide it)
            self.skipped += 1
            if self.skipped >= MAX_SKIPPED:
                raise InvalidInput(f"pretrain: {self.skipped} steps in a row had a non-finite loss or "
                                         f"gradient (step {step}); lower --lr")
        out = {"loss": loss.item(), "grad_norm": float(gnorm), "lr": lr_at(step, self.cfg), "skipped": float(not ok)}
        out.update({k: terms[k].item() for k in ("camera", "depth", "point", "track") if k in terms})
        return out

    def track_queries(self, step: int, valid: Tensor) -> Tensor:
        """`track_points` random pixels (x, y) [B,N,2] of frame 0 with valid depth (valid [B,H,W]), drawn from
        (seed, step) on the CPU so every device draws the same; a scene with fewer valid pixels repeats some."""
        g = torch.Generator().manual_seed(train_seed(self.cfg.seed, step, self.cfg.batch))
        B, H, W = valid.shape
        score = torch.rand(B, H * W, generator=g).to(valid.device) + valid.flatten(1).float()  # valid ones first
        idx = score.topk(self.cfg.track_points, dim=1).indices
        return torch.stack([idx % W, idx // W], -1).float()

    def state(self, step: int, history: list[dict], extra: dict) -> tuple[dict[str, Tensor], dict]:
        tensors, resume = training_state(self.params, self.opt)
        info = {"format": FORMAT, "step": step, "config": self.cfg.to_json(), "backbone": self.cfg.backbone,
                **resume, "history": history, "skipped": self.skipped, **extra}
        return tensors, info

    def load_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        load_training_state(self.params, self.opt, tensors, info)
        self.skipped = info.get("skipped", 0)

    def weights_fp16(self) -> dict[str, Tensor]:
        """The shipped form: every tensor of the state dict in fp16 (checked to fit its range)."""
        out = {}
        for k, v in self.model.state_dict().items():
            v = v.detach().float().cpu()
            if v.abs().max() > 6e4:
                raise InvalidInput(f"pretrain: {k} exceeds fp16's range ({float(v.abs().max()):.3g})")
            out[k] = v.half().contiguous()
        return out


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
             device: str | None = None, quiet: bool = False, explicit: set[str] | None = None,
             stop_after: int | None = None, command: str | None = None) -> dict:
    """Run (or resume) a pretraining run; returns the summary written to metrics.json (with the loss history).
    `resume`: go on with the run in `out` (lite3r_recon.runs.resume_config: its saved config; from step 0 when it
    has no checkpoint yet; an error when there is no run). `explicit`: the config fields the user set (checked
    against a resumed run; None: all). `stop_after`: stop once
    that step is done, as if killed there (for tests)."""
    from lite3r_recon.io import atomic_write_bytes, atomic_write_text, console as make_console

    d = init_dist(device)
    if d.world > 1:
        raise InvalidInput("lite3r pretrain runs in one process (a tiny or small teacher fits one GPU)")
    if d.device.type == "cuda":  # the fp32 heads' matmuls on TF32 tensor cores (convolutions already are)
        torch.backends.cuda.matmul.allow_tf32 = True
    run = RunDir(out, files=FILES)
    cfg, saved = resume_config(run, cfg, resume=resume, overwrite=overwrite, explicit=explicit, resumable=RESUMABLE)
    console = make_console(quiet)
    trainer = Pretrainer(cfg, d.device)
    n_params = sum(p.numel() for p in trainer.params.values())
    atomic_write_text(run.out / "config.json", json.dumps(cfg.to_json(), indent=1), overwrite=True)
    H, W = cfg.res
    console.print(f"[bold]lite3r pretrain[/] {cfg.backbone} ({n_params:,} parameters) on {d.device}: {cfg.steps} steps "
                  f"x {cfg.batch} new scenes x {cfg.views} views at {H}x{W}, lr {cfg.lr}")
    data = heldout_data(max(cfg.eval_scenes, 1), cfg.res, device=d.device)
    n_curve = min(4, cfg.eval_scenes)

    def curve_point(step: int) -> dict:
        m = heldout_metrics(trainer.model, data, device=d.device, scenes=n_curve, views=cfg.views, points=False)
        return {"step": step, **{k: m[k] for k in ("auc30", "abs_rel") if k in m}}

    history: list[dict] = []
    evals: list[dict] = []
    start, init_metrics = 0, {}
    if saved is not None:
        trainer.load_state(run.load_tensors(saved), saved)
        history, evals, start = saved["history"], saved.get("evals", []), saved["step"]
        init_metrics = saved.get("init_metrics", {})
        console.print(f"resumed {run.out} at step {start}")
    elif cfg.eval_scenes:
        init_metrics = heldout_metrics(trainer.model, data, device=d.device, scenes=cfg.eval_scenes, views=cfg.views)
        evals.append({"step": 0, **{k: init_metrics[k] for k in ("auc30", "abs_rel") if k in init_metrics}})

    def checkpoint(step: int) -> None:
        tensors, info = trainer.state(step, history, {"init_metrics": init_metrics, "evals": evals})
        run.save(step, tensors, info)

    t0, done, saved_at = time.perf_counter(), 0, start
    previous = _stop_on_sigterm()
    try:
        with progress(console, cfg.steps, start, "pretrain") as (bar, task):
            for step in range(start, cfg.steps):
                terms = trainer.step(step)
                history.append({"step": step + 1, **terms})
                done += 1
                vps = done * cfg.batch * cfg.views / (time.perf_counter() - t0)
                bar.update(task, advance=1, losses=fmt_terms(terms, ("loss", "camera", "depth", "point", "track")),
                           vps=f"{vps:.0f}")
                if n_curve and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    evals.append(curve_point(step + 1))
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                    checkpoint(step + 1)
                    saved_at = step + 1
                if stop_after is not None and step + 1 >= stop_after:
                    return {"stopped_at": step + 1, "history": history}
    except KeyboardInterrupt:  # Ctrl-C: keep what is done (a kill -9 resumes from the last periodic checkpoint)
        if history and history[-1]["step"] > saved_at:
            checkpoint(history[-1]["step"])
        console.print(f"interrupted; checkpoint in {run.ckpt} (continue with --resume)")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - t0

    weights = trainer.weights_fp16()
    with torch.no_grad():  # measure what is shipped: the fp16-rounded weights
        for k, v in trainer.model.state_dict().items():
            v.copy_(weights[k])
    final = heldout_metrics(trainer.model, data, device=d.device, scenes=cfg.eval_scenes, views=cfg.views) \
        if cfg.eval_scenes else {}
    if final:
        evals.append({"step": cfg.steps, **{k: final[k] for k in ("auc30", "abs_rel") if k in final}})
    command = command or reproduce_command(cfg)
    info = {"format": FORMAT, "backbone": cfg.backbone, "config": cfg.to_json(), "command": command,
            "seed": cfg.seed, "parameters": n_params, "dtype": "float16",
            "heldout": {"seeds": f"{HELDOUT} + k, k < {cfg.eval_scenes}", "views": cfg.views, "size": list(cfg.res)},
            "metrics": {"random_init" if cfg.init is None else "init": init_metrics, "trained": final},
            "train_seconds": round(seconds, 1), "device": str(d.device),
            "gpu": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None}
    from safetensors.torch import save

    atomic_write_bytes(run.out / "teacher.safetensors",
                       save(weights, metadata={"lite3r_pretrain": json.dumps(info)}), overwrite=True)
    atomic_write_text(run.out / "teacher.json", json.dumps(info, indent=1), overwrite=True)
    summary = {**info, "evals": evals, "final_losses": history[-1] if history else {},
               "first_losses": history[0] if history else {},
               "files": {"weights": "teacher.safetensors", "info": "teacher.json", "plot": "loss.png",
                         "heldout_plot": "heldout.png"}}
    atomic_write_text(run.out / "metrics.json", json.dumps({**summary, "history": history}, indent=1),
                      overwrite=True)
    panels = [("task loss", ("loss",), True), ("terms", ("camera", "depth", "point", "track"), True)]
    atomic_write_bytes(run.out / "loss.png", loss_plot(history, panels, f"lite3r pretrain {cfg.backbone}"),
                       overwrite=True)
    if evals:
        atomic_write_bytes(run.out / "heldout.png",
                           loss_plot(evals, [("held-out AUC@30", ("auc30",), False),
                                             ("held-out AbsRel", ("abs_rel",), True)],
                                     f"{cfg.backbone}: held-out scenes over training"), overwrite=True)
    console.print(_table(cfg, init_metrics, final))
    console.print(f"wrote {run.out}/teacher.safetensors (+ teacher.json), metrics.json, loss.png in {seconds:.0f} s")
    summary["history"] = history
    return summary


def _stop_on_sigterm():
    """SIGTERM (a scheduler's pre-emption, `timeout`) stops the run like Ctrl-C: it checkpoints the steps done.
    Returns the previous handler (None where no handler can be installed: not the main thread)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


def reproduce_command(cfg: PretrainConfig) -> str:
    """The `lite3r pretrain` command line that makes this run (every option spelled out)."""
    return (f"lite3r pretrain {cfg.family} --size {cfg.size} --steps {cfg.steps} --batch {cfg.batch} --views "
            f"{cfg.views} --res {cfg.res[0]},{cfg.res[1]} --lr {cfg.lr} --warmup {cfg.warmup} --weight-decay "
            f"{cfg.weight_decay} --w-camera {cfg.w_camera:g} --w-depth {cfg.w_depth:g} --w-point {cfg.w_point:g} "
            + (f"--w-track {cfg.w_track:g} --track-points {cfg.track_points} " if cfg.w_track else "") +
            f"--seed {cfg.seed} --fov-init {cfg.fov_init:g}" + (f" --arc {cfg.arc[0]:g},{cfg.arc[1]:g}" if cfg.arc != ARC
                                                                 else "") + (f" --sky {cfg.sky}" if cfg.sky != "plain" else "")
            + (f" --init {cfg.init}" if cfg.init else ""))


def _table(cfg: PretrainConfig, init: dict, final: dict):
    from rich.table import Table

    table = Table(title=f"{cfg.backbone} on {cfg.eval_scenes} held-out synthetic scenes ({cfg.views} views, "
                        f"{cfg.res[0]}x{cfg.res[1]})")
    table.add_column("metric")
    table.add_column("random init" if cfg.init is None else "start (--init)", justify="right")
    table.add_column("pretrained", justify="right")
    for k in SHOW:
        if k in final or k in init:
            table.add_row(k, *[f"{m[k]:.4g}" if k in m else "-" for m in (init, final)])
    return table


def main(family: str, *, size: str | None = None, out: str | None = None, resume: bool = False,
         overwrite: bool = False, device: str | None = None, quiet: bool = False, **fields) -> dict:
    """The CLI's entry: `size` and `fields` are the options the user gave (None: not given: the default, or with
    `resume` the run's saved value)."""
    given = {k: v for k, v in {**fields, "size": size}.items() if v is not None}
    if "res" in given:
        from lite3r_recon.train_config import parse_res

        given["res"] = parse_res(given["res"])
    if "arc" in given and isinstance(given["arc"], str):
        try:
            given["arc"] = tuple(float(a) for a in given["arc"].split(","))
        except ValueError:
            raise InvalidInput(f"--arc takes MIN,MAX in degrees like 20,60; got {given['arc']!r}") from None
    cfg = PretrainConfig(family=family, **given)
    out = out or f"runs/pretrain-{cfg.backbone}"
    return pretrain(cfg, out, resume=resume, overwrite=overwrite, device=device, quiet=quiet,
                    explicit=set(given) | {"family"})


if __name__ == "__main__":
    pretrain(PretrainConfig(steps=20, batch=2, eval_scenes=2), "runs/pretrain-default", overwrite=True)
