"""The configuration of `lite3r train`: a frozen dataclass saved with every checkpoint (torch-free, so the CLI can
show its defaults without importing torch)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from lite3r_recon.errors import InvalidInput, MissingInput

FAMILIES = {"vggt": {"tiny": "vggt-tiny", "full": "vggt-1b"}, "da3": {"tiny": "da3-tiny", "full": "da3-large"}}
DEFAULT_RES = {"tiny": (126, 168), "full": (518, 518)}
RESUMABLE = ("steps", "ckpt_every", "eval_scenes")  # may change on --resume; everything else must match


def resolve_backbone(model: str, *, full: bool) -> str:
    """How every command reads its MODEL: a family (vggt, da3) is its full model (vggt-1b, da3-large) when `full`
    (real weights given, or a GPU benchmark), else its tiny one; a backbone name (vggt-tiny, da3-large, ...) passes
    through (checked against the registry when the model is built)."""
    return FAMILIES[model]["full" if full else "tiny"] if model in FAMILIES else model


def check_sparsity(topk: float, kept_blocks: int | None) -> None:
    """--topk (kept fraction of key blocks) and --kept-blocks (a count per query block), as every command takes them."""
    if not 0 < topk <= 1:
        raise InvalidInput(f"--topk is the kept fraction of key blocks, in (0, 1]; got {topk}")
    if kept_blocks is not None and (isinstance(kept_blocks, bool) or not isinstance(kept_blocks, int)
                                    or kept_blocks < 1):
        raise InvalidInput(f"--kept-blocks is a count of key blocks per query block, at least 1; got {kept_blocks!r}")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the task loss terms (defaults: the official VGGT training config)."""

    camera: float = 5.0
    depth: float = 1.0
    point: float = 1.0
    track: float = 0.0  # tracking (VGGT, when the ground truth has tracks); the official training uses 0.05 at 518 px
    trans: float = 1.0
    rot: float = 1.0
    focal: float = 0.5
    camera_gamma: float = 0.6  # decay over the camera head's refinement iterations
    track_gamma: float = 0.8  # decay over the tracker's refinement iterations
    conf_gamma: float = 1.0
    conf_alpha: float = 0.2  # weight of -log(conf)
    grad_scales: int = 3
    valid_range: float = 0.98  # per-sample quantile above which pixel errors are dropped (<= 0: keep all)
    min_valid: int = 16  # frames / samples with fewer valid pixels are skipped (VGGT uses 100 at 518 px)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidInput(f"loss weight {f.name} must be finite, got {v}")
        if self.conf_alpha < 0 or self.grad_scales < 0:
            raise InvalidInput("conf_alpha and grad_scales must be non-negative")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Saved with every checkpoint; the CLI overrides fields by name."""

    model: str = "vggt"  # family (vggt, da3) or a backbone name (vggt-tiny, vggt-1b, da3-tiny, da3-large)
    size: str | None = None  # tiny | full; default: full with --teacher, else tiny
    teacher: str | None = None  # dense checkpoint; None: random weights drawn from `seed`
    dataset: str = "synthetic"  # synthetic | blendedmvs
    data: str | None = None  # dataset root; None with synthetic: scenes rendered on the fly
    scenes: int | None = None  # distinct training scenes (a seed-determined pool, cycled); 0: a new scene for every
    #                            sample; default: 16 for synthetic scenes on the fly, 0 (all) with --data
    steps: int = 60
    batch: int = 2  # scenes per step, over all ranks
    views: int = 4  # views per scene
    res: tuple[int, int] | None = None  # (H, W), multiples of 14; default 126x168 tiny, 518x518 full
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9; its updates are linear in the gradient)
    lr: float = 3e-3
    trainable: str = "proj_l"  # proj_l (DESIGN: only SLA's new projections) | attention (also the SLA layers' own
    #                            qkv, q/k norms and proj: the inherited weights of the sparse layers, at lr_inherited)
    lr_inherited: float = 1e-4  # peak lr of the inherited weights --trainable attention unfreezes
    warmup: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lambda_kd: float = 1.0
    kd_norm: bool = True  # each module's MSE relative to the teacher output's mean square (scale-free)
    target: str | None = None  # task-loss target: gt | teacher (pseudo-labels); default: gt, except teacher for a
    #                            random teacher (full size without --teacher), whose geometry is not the scene's
    distill: str = "global"  # global | all | comma-separated attention-module indices
    sla: str = "global"  # which attention becomes SLA: global (cross-view) | all
    topk: float = 0.05  # SLA kept fraction of key blocks
    kept_blocks: int | None = None  # SLA kept key blocks per query block, a count instead of topk (cost linear in N)
    block: int = 64  # SLA block size (queries and keys)
    feature_map: str = "softmax"  # softmax | elu | relu
    fp8: bool = True  # FP8 fake quant on the linears
    grad_ckpt: bool = False  # activation checkpointing per transformer block of the student
    w_camera: float = LossWeights.camera  # the task-loss weights the CLI exposes; the rest stay LossWeights'
    w_depth: float = LossWeights.depth
    w_point: float = LossWeights.point
    seed: int = 0
    ckpt_every: int = 20
    eval_scenes: int = 4

    def __post_init__(self):
        family = self.family
        if family not in FAMILIES:
            raise InvalidInput(f"model must be vggt, da3 or a backbone name (vggt-tiny, vggt-1b, da3-tiny, da3-large); "
                             f"got {self.model!r}")
        if self.model in FAMILIES:
            size = self.size or ("full" if self.teacher else "tiny")
        else:  # a backbone name fixes the size
            size = "tiny" if "tiny" in self.model else "full"
        if size not in ("tiny", "full"):
            raise InvalidInput(f"--size must be tiny or full, got {self.size!r}")
        object.__setattr__(self, "size", size)
        res = tuple(self.res) if self.res else DEFAULT_RES.get(size, DEFAULT_RES["tiny"])
        if len(res) != 2 or any(int(r) <= 0 or int(r) % 14 for r in res):
            raise InvalidInput(f"--res must be H,W or one size, positive multiples of the patch size 14; got {self.res}")
        object.__setattr__(self, "res", (int(res[0]), int(res[1])))
        if self.dataset not in ("synthetic", "blendedmvs"):
            raise InvalidInput(f"--dataset must be synthetic or blendedmvs, got {self.dataset!r}")
        if self.dataset == "blendedmvs" and not self.data:
            raise InvalidInput("--dataset blendedmvs needs --data PATH (a BlendedMVS root)")
        if self.data and not Path(self.data).exists():
            raise MissingInput(f"--data {self.data}: no such directory")
        if self.teacher and not Path(self.teacher).is_file():
            raise MissingInput(f"--teacher {self.teacher}: no such file")
        object.__setattr__(self, "scenes", (0 if self.data else 16) if self.scenes is None else self.scenes)
        if self.scenes < 0:
            raise InvalidInput(f"--scenes must be 0 (a new scene for every sample) or positive, got {self.scenes}")
        for name in ("steps", "batch", "views", "block", "ckpt_every"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.eval_scenes < 0:
            raise InvalidInput("--warmup and --eval-scenes must be non-negative")
        check_sparsity(self.topk, self.kept_blocks)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInput(f"--lr must be positive, got {self.lr}")
        if self.lambda_kd < 0 or min(self.w_camera, self.w_depth, self.w_point) < 0:
            raise InvalidInput("--lambda-kd and the task loss weights must be non-negative")
        check_trainable(self.trainable)
        if not (self.lr_inherited > 0 and math.isfinite(self.lr_inherited)):
            raise InvalidInput(f"--lr-inherited must be positive, got {self.lr_inherited}")
        if self.optimizer not in ("adamw", "sgd"):
            raise InvalidInput(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.sla not in ("global", "all"):
            raise InvalidInput(f"--sla must be global or all, got {self.sla!r}")
        if self.feature_map not in ("softmax", "elu", "relu"):
            raise InvalidInput(f"--feature-map must be softmax, elu or relu, got {self.feature_map!r}")
        # the task target: the scenes' ground truth, unless the teacher is random (a full-size model without
        # --teacher has no shipped weights), whose geometry is not the scene's - then its own predictions
        object.__setattr__(self, "target", self.target or ("teacher" if not self.teacher and size == "full" else "gt"))
        check_target(self.target)
        distill_select(self.distill)  # validates

    @property
    def family(self) -> str:
        return self.model.split("-")[0]

    @property
    def backbone(self) -> str:
        return resolve_backbone(self.model, full=self.size == "full")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def sla_config(self):
        """The student's lite3r.SLAConfig: --topk (or --kept-blocks) on the --sla scopes (global: cross-view only; all:
        every attention)."""
        import lite3r

        return lite3r.SLAConfig(topk=self.topk, block_q=self.block, block_k=self.block, feature_map=self.feature_map,
                                scopes=("global",) if self.sla == "global" else None, kept_blocks=self.kept_blocks)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "res" and v else v) for k, v in d.items() if k in known})


TRAINABLE = ("proj_l", "attention")  # what QAT trains (TrainConfig.trainable)


def check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise InvalidInput(f"--trainable must be {' or '.join(TRAINABLE)}, got {trainable!r}")


TARGETS = ("gt", "teacher")  # what QAT's task loss compares with (TrainConfig.target)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise InvalidInput(f"--target must be {' or '.join(TARGETS)}, got {target!r}")


def distill_select(spec: str) -> str | list[int] | None:
    """--distill: "global" (cross-view layers, the default "partial" distillation), "all", or "0,5,11"."""
    spec = str(spec).strip()
    if spec in ("global", "all"):
        return None if spec == "all" else "global"
    try:
        idx = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise InvalidInput(f"--distill takes global, all or attention-module indices like 0,5,11; got {spec!r}") from None
    if not idx or idx[0] < 0:
        raise InvalidInput(f"--distill indices must be non-negative integers, got {spec!r}")
    return idx


def parse_res(text: str) -> tuple[int, int]:
    """--res: "518" -> (518, 518); "294,518" -> (294, 518)."""
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise InvalidInput(f"--res takes H,W or one size in pixels (multiples of 14), got {text!r}") from None
    if len(parts) not in (1, 2):
        raise InvalidInput(f"--res takes H,W or one size in pixels (multiples of 14), got {text!r}")
    return (parts[0], parts[-1])
