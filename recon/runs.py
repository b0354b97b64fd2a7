"""The machinery of a training run, shared by `lite3r train` (QAT of a student) and `lite3r pretrain` (a dense
teacher from scratch): data order as a pure function of (seed, step), the synthetic / dataset scene source, the
run directory with its checkpoints (trainable tensors, optimizer and RNG state, loss history), distributed setup,
the LR schedule, the progress bar and the loss plot.

Data order: sample i of step t is scene `scene_seed(seed, t, i)`, and rank r of W takes samples [r * B/W, (r + 1) *
B/W). Losses are per-sample means, so W ranks of B/W samples each give the gradient of one process with B samples;
`--resume` replays the same sequence bit for bit.

Files of a run (`RunDir`): checkpoints/step-NNNNNN.{safetensors,json} + checkpoints/latest.json; every file goes
through lite3r_recon.io's atomic writers.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from lite3r_recon.errors import InvalidInput, MissingInput, WouldOverwrite


def lr_at(step: int, cfg) -> float:
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
        raise InvalidInput(f"--batch {batch} must be divisible by the number of processes ({world})")
    per = batch // world
    return range(rank * per, (rank + 1) * per)


class SceneSource:
    """Samples: dict(images [S,3,H,W] in [0,1], depth [S,H,W], mask [S,H,W] bool, extrinsics [S,3,4] w2c,
    intrinsics [S,3,3]) for a scene seed; synthetic scenes are rendered on the fly, BlendedMVS read from --data."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cache: dict[int, dict[str, Tensor]] | None = {} if cfg.scenes else None
        self.dataset = None
        self.bad: set[int] = set()  # scenes of --data skipped (too few usable views)
        if cfg.data:
            from lite3r_recon import datasets

            self.dataset = datasets.open_dataset(cfg.dataset, cfg.data, size=cfg.res)
            if len(self.dataset) == 0:
                raise InvalidInput(f"--data {cfg.data}: no {cfg.dataset} scenes found")

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
            from lite3r_recon.datasets import sample_or_skip

            rng = np.random.default_rng(seed)
            s = None
            while s is None:  # a scene that cannot give its views is skipped: draw another (too many: an error)
                s = sample_or_skip(self.dataset, int(rng.integers(len(self.dataset))), self.cfg.views, rng,
                                   bad=self.bad)
        out = {k: torch.as_tensor(s[k]) for k in ("images", "depth", "extrinsics", "intrinsics")}
        out["mask"] = torch.as_tensor(s["mask"]).bool() if "mask" in s else out["depth"] > 0
        return out

    def batch(self, seeds: list[int]) -> dict[str, Tensor]:
        samples = [self.sample(s) for s in seeds]
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}



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

    if device is not None:  # --device cuda without CUDA, a bad name: one line naming the flag
        from lite3r_recon.models import resolve_device

        resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda and world > 1 else (device or ("cuda" if use_cuda else "cpu")))
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" means the current device; set_device needs an index
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def barrier(d: Dist) -> None:
    if d.world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": random.getstate()}


def set_rng_state(tensors: dict[str, Tensor], info: dict) -> None:
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

    OURS = ("config.json", "metrics.json", "loss.png")

    def __init__(self, out: str | os.PathLike, *, files: tuple[str, ...] = ()):
        """`files`: the run's own outputs besides OURS (what --overwrite clears and what marks a run)."""
        self.out = Path(out)
        self.ckpt = self.out / "checkpoints"
        self.OURS = RunDir.OURS + tuple(files)

    def exists(self) -> bool:
        return any((self.out / f).exists() for f in self.OURS) or (self.ckpt / "latest.json").exists()

    def prepare(self, *, resume: bool, overwrite: bool) -> dict | None:
        """Returns the latest checkpoint's JSON when resuming one, else None (after clearing with overwrite). With
        `resume`, a run must be there: its checkpoint, or at least its config.json (killed before the first
        checkpoint: nothing is cleared, `resume_config` restarts the saved config from step 0)."""
        if self.out.exists() and not self.out.is_dir():
            raise WouldOverwrite(f"--out {self.out} is a file, not a directory")
        from lite3r_recon.io import check_writable, remove_temporaries

        check_writable(self.out, folder=True)  # a read-only --out: one line now, not at the first checkpoint
        for folder in (self.out, self.ckpt):  # what a kill mid-write left (the run is ours: no live writer)
            remove_temporaries(folder)
        if resume and (self.ckpt / "latest.json").exists():
            latest = _run_json(self.ckpt / "latest.json")
            return _run_json(self.ckpt / f"{latest.get('name')}.json")
        if resume:
            if not self.out.is_dir():
                raise MissingInput(f"--resume: --out {self.out} does not exist, there is no run to resume "
                                   f"(drop --resume to start one)")
            if not (self.out / "config.json").is_file():
                raise MissingInput(f"--resume: --out {self.out} holds no run (no config.json, no checkpoint); drop "
                                   f"--resume to start one there")
            return None
        if self.exists() and not overwrite:
            raise WouldOverwrite(f"--out {self.out} holds a training run; pass --resume to continue it or "
                                  f"--overwrite to start over")
        if self.exists():
            for f in self.OURS:
                (self.out / f).unlink(missing_ok=True)
            if self.ckpt.is_dir():
                for f in self.ckpt.glob("step-*.*"):
                    f.unlink()
                (self.ckpt / "latest.json").unlink(missing_ok=True)
        return None

    def saved_config(self) -> dict:
        """The run's config.json (what `lite3r train` / `pretrain` write before their first step)."""
        path = self.out / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InvalidInput(f"--resume: {path} is not a readable run config ({err})") from None

    def save(self, step: int, tensors: dict[str, Tensor], info: dict, keep: int = 2) -> None:
        from safetensors.torch import save

        from lite3r_recon.io import atomic_write_bytes, atomic_write_text

        name = f"step-{step:06d}"
        atomic_write_bytes(self.ckpt / f"{name}.safetensors",
                           save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}), overwrite=True)
        atomic_write_text(self.ckpt / f"{name}.json", json.dumps(info), overwrite=True)
        atomic_write_text(self.ckpt / "latest.json", json.dumps({"name": name, "step": step}), overwrite=True)
        for old in sorted(self.ckpt.glob("step-*.json"))[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    def load_tensors(self, info: dict) -> dict[str, Tensor]:
        from lite3r_backbones.checkpoint import read_safetensors

        return read_safetensors(self.ckpt / f"step-{info['step']:06d}.safetensors", "training checkpoint")[1]


def _run_json(path: Path) -> dict:
    """A run's JSON file (latest.json, a checkpoint's), a missing or corrupt one as one line naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidInput(f"--resume: {path} is not a readable checkpoint record ({err}); the run folder is "
                           f"damaged: --overwrite starts over") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"--resume: {path} is not a checkpoint record (a JSON object)")
    return data


def resume_config(run: RunDir, asked, *, resume: bool, overwrite: bool, explicit: set[str] | None,
                  resumable: tuple[str, ...]):
    """(the config a run goes on with, its latest checkpoint's JSON or None: from step 0) - what --resume means for
    `lite3r train` and `lite3r pretrain` alike. Without `resume`: `asked` (once `RunDir.prepare` has refused, or with
    `overwrite` cleared, a run already in --out). With it the run's SAVED config wins (its latest checkpoint's, else
    its config.json: killed before the first checkpoint, the run restarts from step 0 as it was configured, never
    with the command line's defaults); an option given explicitly (`explicit`: field names; None: all) that
    contradicts it is a one-line error, except the `resumable` ones, which it takes (--steps to extend a run).
    `asked`: a frozen config dataclass with from_json."""
    saved = run.prepare(resume=resume, overwrite=overwrite)
    if not resume:
        return asked, None
    cls = type(asked)
    old = cls.from_json(saved["config"] if saved is not None else run.saved_config())
    names = [f.name for f in dataclasses.fields(cls)]
    explicit = set(names) if explicit is None else set(explicit)
    diff = [n for n in names if n in explicit and n not in resumable and getattr(old, n) != getattr(asked, n)]
    if diff:
        said = ", ".join(f"--{n.replace('_', '-')} {_show(getattr(old, n))}, asked {_show(getattr(asked, n))}"
                         for n in diff)
        raise InvalidInput(f"--resume: the run in {run.out} was made with other settings ({said}); drop those options "
                           f"to resume its saved config (only {', '.join('--' + r.replace('_', '-') for r in resumable)}"
                           f" may change)")
    return dataclasses.replace(old, **{r: getattr(asked, r) for r in resumable if r in explicit}), saved


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def training_state(params: dict[str, Tensor], opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """A resumable point of a run: (tensors, JSON) of the trainable parameters (`param.NAME`), the optimizer state and
    every RNG state; `load_training_state` puts them back exactly."""
    opt_t, groups = optimizer_tensors(opt)
    rng_t, rng_j = rng_state()
    return {**{f"param.{n}": p for n, p in params.items()}, **opt_t, **rng_t}, {"param_groups": groups, "rng": rng_j}


def load_training_state(params: dict[str, Tensor], opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                        info: dict) -> None:
    """Inverse of `training_state`, strictly: every trainable parameter must be in the checkpoint."""
    from lite3r_recon.errors import MismatchedKeys

    with torch.no_grad():
        for n, p in params.items():
            if f"param.{n}" not in tensors:
                raise MismatchedKeys(f"checkpoint has no tensor for {n}: it was made by another configuration")
            p.copy_(tensors[f"param.{n}"])
    load_optimizer(opt, tensors, info["param_groups"])
    set_rng_state(tensors, info["rng"])


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


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)



class progress:
    """A rich progress bar of `total` steps (from `start`) with the step's losses and views/s: `with progress(console,
    total, start, label) as (bar, task): bar.update(task, advance=1, losses=..., vps=...)`."""

    def __init__(self, console, total: int, start: int, label: str = "train"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"[bold blue]{label}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[losses]}"), TextColumn("{task.fields[vps]} views/s"),
                          TimeRemainingColumn(), console=console, transient=False, disable=console.quiet)
        self.task = self.p.add_task(label, total=total, completed=start, losses="", vps="-")

    def __enter__(self):
        self.p.__enter__()
        return self.p, self.task

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)



def fmt_terms(terms: dict[str, float], keys: tuple[str, ...]) -> str:
    """The loss terms of one step for the progress bar."""
    return " ".join(f"{k} {terms[k]:.4g}" for k in keys if k in terms)


def loss_plot(history: list[dict], panels: list[tuple[str, tuple[str, ...], bool]], title: str) -> bytes:
    """PNG of the loss history: one panel per (title, keys, log scale) over the recorded steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, (name, keys, log) in zip(axes[0], panels):
        for k in keys:
            if history and k in history[0]:
                ax.plot(steps, [h[k] for h in history], label=k)
        if log:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
