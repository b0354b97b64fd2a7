"""`lite3r study`: the paper's quality table for one teacher on held-out data.

Rows, all on the same scenes (held-out synthetic scenes by default, or --dataset blendedmvs / dtu64 --data PATH):

    dense                  the teacher (the shipped tiny teacher, or --weights)
    sla K                  SLA on global attention at kept fraction K, untrained (proj_l = 0: the sparse branch alone)
    sla K + fp8            the same + FP8 fake quant on the linears
    sla B blocks (+ fp8)   SLA keeping a count of B key blocks per query block (--kept-blocks: the sparsity whose cost
                           grows linearly with the views, as `lite3r bench --kept-blocks` deploys it), untrained
    qat                    SLA at the last K + FP8 after QAT + partial distillation (a short `lite3r train` run with
                           task + attention-distillation loss, or the trained --student)
    distill only           the same training, task-loss weights 0 (attention distillation alone)
    task only              the same training, lambda_kd 0 (task loss alone)
    sparse only            = "sla K + fp8": only proj_l trains and proj_l is the linear branch's, so without a linear
                           branch there is nothing to train
    linear only            every SLA attention -> its linear branch alone, proj_l = I (training-free: lite3r train has
                           no linear-only mode)

Metrics per row: AUC@30 / @5, RRA / RTA @5, AbsRel, delta1, Chamfer, F-score (lite3r eval's protocol), plus the number
of global-attention tokens and key blocks the topk fractions act on. Files in --out: study.json, study.png (quality
against the kept fraction), and the training runs (qat/, distill-only/, task-only/).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

import lite3r
from lite3r_recon.errors import InvalidInput, MissingInput

METRICS = ("auc30", "auc5", "rra5", "rta5", "abs_rel", "delta1", "chamfer", "fscore")
HEADERS = {"auc30": "AUC@30", "auc5": "AUC@5", "rra5": "RRA@5", "rta5": "RTA@5", "abs_rel": "AbsRel",
           "delta1": "d1", "chamfer": "Chamfer", "fscore": "F"}
TRAINED = {  # row -> TrainConfig changes of its training run
    "qat": {},
    "distill only": {"w_camera": 0.0, "w_depth": 0.0, "w_point": 0.0},
    "task only": {"lambda_kd": 0.0},
}
DEFAULT_SIZE = {"tiny": (126, 168), "small": (252, 252)}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    model: str = "vggt-tiny"  # backbone name
    weights: str | None = None  # dense checkpoint; None: the shipped teacher (tiny) or random weights
    dataset: str = "synthetic"  # synthetic (held-out scenes) | blendedmvs | dtu64
    data: str | None = None
    scenes: int = 8
    views: int = 4
    size: tuple[int, int] | None = None  # default: 126x168 tiny, 252x252 small, 518x518 otherwise
    topks: tuple[float, ...] = (0.3, 0.1, 0.05)
    kept_blocks: tuple[int, ...] = ()  # also rows at these counts of kept key blocks per query block (untrained)
    block: int = 64
    student: str | None = None  # a trained student for the "qat" row (no training run then)
    train_steps: int = 60
    train_batch: int = 2
    lr: float = 3e-3
    trainable: str = "proj_l"  # what the trained rows train: proj_l | attention (lite3r train --trainable)
    lr_inherited: float = 1e-4  # their peak learning rate of the inherited weights (trainable attention)
    target: str = "gt"  # their task-loss target: gt | teacher (its predictions; lite3r train --target)
    ablations: bool = True
    seed: int = 0

    def __post_init__(self):
        from lite3r_backbones import list_backbones

        if self.model not in list_backbones():
            raise InvalidInput(f"study: unknown backbone {self.model!r}; available: {', '.join(list_backbones())}")
        if self.dataset not in ("synthetic", "blendedmvs", "dtu64"):
            raise InvalidInput(f"--dataset must be synthetic, blendedmvs or dtu64, got {self.dataset!r}")
        if self.dataset != "synthetic" and not self.data:
            raise InvalidInput(f"--dataset {self.dataset} needs --data PATH")
        if self.data and not Path(self.data).exists():
            raise MissingInput(f"--data {self.data}: no such folder")
        if self.weights and not Path(self.weights).is_file():
            raise MissingInput(f"--weights {self.weights}: no such file")
        if self.student and not Path(self.student).exists():
            raise MissingInput(f"--student {self.student}: no such file or run folder")
        if not self.topks or not all(0 < k <= 1 for k in self.topks):
            raise InvalidInput(f"--topk values are kept fractions in (0, 1], got {self.topks}")
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.kept_blocks):
            raise InvalidInput(f"--kept-blocks values are counts of key blocks per query block, >= 1; got "
                               f"{self.kept_blocks}")
        from lite3r_recon.train_config import check_target, check_trainable

        check_trainable(self.trainable)
        check_target(self.target)
        if self.scenes < 1 or self.views < 2 or self.block < 1 or self.train_steps < 1:
            raise InvalidInput("--scenes, --block and --train-steps must be >= 1 and --views >= 2")
        size = self.size or DEFAULT_SIZE.get(self.model.split("-")[-1], (518, 518))
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if any(s <= 0 or s % 14 for s in size):
            raise InvalidInput(f"--size must be multiples of the patch size 14, got {size}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "topks", tuple(float(k) for k in self.topks))
        object.__setattr__(self, "kept_blocks", tuple(self.kept_blocks))

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------------ the variants
def linear_only(student: nn.Module) -> int:
    """In place: every SLAAttention of `student` computes its linear branch alone, through proj_l = I."""
    n = 0
    for m in student.modules():
        if isinstance(m, lite3r.SLAAttention):
            m.branches = "linear"
            with torch.no_grad():
                m.proj_l.weight.copy_(torch.eye(m.head_dim))
                m.proj_l.bias.zero_()
            n += 1
    return n


def _student(teacher: nn.Module, cfg: StudyConfig, topk: float, fp8: bool, kept_blocks: int | None = None
             ) -> nn.Module:
    from lite3r_recon import models

    sla = lite3r.SLAConfig(topk=topk, block_q=cfg.block, block_k=cfg.block, kept_blocks=kept_blocks)
    return models.make_student(teacher, sla, fp8=fp8).eval()


def attention_tokens(model: nn.Module, images: Tensor) -> int:
    """Tokens per sequence in the model's global (cross-view) attention on `images` [S,3,H,W]."""
    seen: list[int] = []
    targets = [m for n, m in model.named_modules() if hasattr(m, "qkv") and getattr(m, "scope", "global") == "global"]
    if not targets:
        return 0
    h = targets[0].register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[1])) if args else None)
    try:
        with torch.no_grad():
            model(images[None].to(next(model.parameters()).device))
    finally:
        h.remove()
    return seen[0] if seen else 0


def train_run(cfg: StudyConfig, row: str, out: Path, *, device, quiet: bool, overwrite: bool,
              resume: bool = False) -> Path:
    """The short `lite3r train` run of a trained row (SLA at the last topk + FP8); returns its folder. `resume`: a
    finished run in its folder is taken as it is, a killed one goes on from its last checkpoint."""
    from lite3r_recon.qat import train
    from lite3r_recon.train_config import TrainConfig

    tc = TrainConfig(model=cfg.model, teacher=cfg.weights, steps=cfg.train_steps, batch=cfg.train_batch,
                     views=cfg.views, res=cfg.size, topk=cfg.topks[-1], block=cfg.block, fp8=True,
                     target=cfg.target, lr=cfg.lr, trainable=cfg.trainable, lr_inherited=cfg.lr_inherited,
                     eval_scenes=0, seed=cfg.seed, ckpt_every=max(1, cfg.train_steps),
                     **TRAINED[row])
    run = out / row.replace(" ", "-")
    if resume and (run / "student.safetensors").is_file() and (run / "metrics.json").is_file():
        return run
    train(tc, run, resume=resume and (run / "config.json").is_file(), overwrite=True, device=device, quiet=quiet)
    return run


def study(cfg: StudyConfig, out: str | os.PathLike, *, device: str | None = None, overwrite: bool = False,
          quiet: bool = False, resume: bool = False) -> dict:
    """What `lite3r study` does; returns {"config", "rows": [{"row", "topk", "fp8", "trained", metrics...}],
    "tokens", "key_blocks", ...} (also written to study.json). `resume`: go on with a study stopped in `out` (its
    study.partial.json, made with the same config): its rows are kept, its training runs finished or resumed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from lite3r_recon.scoring import heldout_data, heldout_metrics
    from lite3r_recon import datasets, models
    from lite3r_recon.io import atomic_write_bytes, atomic_write_json, console as make_console, ensure_writable

    out = Path(out)
    for f in ("study.json", "study.png"):
        ensure_writable(out / f, overwrite)
    done, runs = _resumed(cfg, out) if resume else ({}, {})
    device = models.resolve_device(device)
    con = make_console(quiet)
    note = models.weights_note(cfg.model, cfg.weights)
    if note:
        con.print(f"[yellow]{note}[/]")
    teacher = models.dense_model(cfg.model, cfg.weights, seed=cfg.seed).to(device)
    if cfg.dataset == "synthetic" and not cfg.data:
        data = heldout_data(cfg.scenes, cfg.size, device=device)
    else:
        data = datasets.open_dataset(cfg.dataset, cfg.data, size=cfg.size)
    n = min(cfg.scenes, len(data))
    tokens = attention_tokens(teacher, data.sample(0, views=cfg.views, rng=None, normalize=True)["images"])
    blocks = math.ceil(tokens / cfg.block)
    con.print(f"[bold]lite3r study[/] {cfg.model} on {n} {cfg.dataset} scenes x {cfg.views} views at "
              f"{cfg.size[0]}x{cfg.size[1]}: {tokens} tokens in global attention = {blocks} key blocks of {cfg.block}; "
              + ", ".join(f"topk {k} keeps {min(blocks, max(1, math.ceil(k * blocks)))}" for k in cfg.topks))

    plan: list[tuple[str, dict, object]] = [("dense", {"topk": 1.0, "fp8": False, "trained": False}, None)]
    for k in cfg.topks:
        plan.append((f"sla {k:g}", {"topk": k, "fp8": False, "trained": False}, ("sla", k, False)))
    for k in cfg.topks:
        plan.append((f"sla {k:g} + fp8", {"topk": k, "fp8": True, "trained": False}, ("sla", k, True)))
    for fp8 in (False, True):
        for b in cfg.kept_blocks:  # topk: the fraction that count is of this sequence's key blocks
            plan.append((f"sla {b} blocks" + (" + fp8" if fp8 else ""),
                         {"topk": min(b, blocks) / blocks, "kept_blocks": b, "fp8": fp8, "trained": False},
                         ("sla", 1.0, fp8, b)))
    k_last = cfg.topks[-1]
    trained_rows = ["qat"] + (["distill only", "task only"] if cfg.ablations else [])
    for r in trained_rows:
        plan.append((r, {"topk": k_last, "fp8": True, "trained": True, "trainable": cfg.trainable,
                         "target": cfg.target}, ("train", r)))
    if cfg.ablations:
        plan.append(("sparse only", {"topk": k_last, "fp8": True, "trained": False,
                                     "note": f"= sla {k_last:g} + fp8 (nothing to train without a linear branch)"},
                     ("alias", f"sla {k_last:g} + fp8")))
        plan.append(("linear only", {"topk": 0.0, "fp8": True, "trained": False, "note": "proj_l = I, untrained"},
                     ("linear",)))

    rows: list[dict] = []
    by_name: dict[str, dict] = {}
    with Progress(TextColumn("[bold blue]study"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[row]}"),
                  console=con, disable=quiet, transient=True) as bar:
        task = bar.add_task("study", total=len(plan), row="")
        for name, meta, how in plan:
            bar.update(task, row=name)
            if name in done:  # --resume: measured before the stop
                rows.append(done[name])
                by_name[name] = done[name]
                bar.advance(task)
                continue
            if how is None:
                model = teacher
            elif how[0] == "sla":
                model = _student(teacher, cfg, *how[1:]).to(device)
            elif how[0] == "train" and name == "qat" and models.is_artifact(cfg.student):
                model = models.load_artifact(cfg.student, device=device)  # a `lite3r export` file, as deployed
                if model.name != teacher.name:
                    raise InvalidInput(f"--student {cfg.student} is a {model.name} artifact, not {teacher.name}")
                runs[name] = str(cfg.student)
                meta = {**meta, "trainable": None, "target": None}  # (not recorded in an artifact)
            elif how[0] == "train":
                if name == "qat" and cfg.student:
                    path = Path(cfg.student)
                    info = models.student_info(path)[1]  # what the given student trained (older runs: proj_l)
                    given = info.get("config", {})
                    meta = {**meta, "trainable": given.get("trainable", "proj_l"), "target": given.get("target")}
                else:
                    path = train_run(cfg, name, out, device=device, quiet=True, overwrite=overwrite, resume=resume)
                runs[name] = str(path)
                model = models.load_student(path, teacher, device=device).eval()
            elif how[0] == "alias":
                row = {"row": name, **meta, **{k: v for k, v in by_name[how[1]].items() if k in METRICS}}
                rows.append(row)
                by_name[name] = row
                bar.advance(task)
                continue
            else:  # linear only
                model = _student(teacher, cfg, k_last, True)
                linear_only(model)
                model = model.to(device)
            m = heldout_metrics(model, data, device=device, scenes=n, views=cfg.views)
            row = {"row": name, **meta, **{k: m[k] for k in METRICS if k in m}}
            rows.append(row)
            by_name[name] = row
            # the rows so far survive a kill or a timeout (a GPU call's limit): study.partial.json, gone at the end
            atomic_write_json(out / "study.partial.json", {"config": cfg.to_json(), "rows": rows, "runs": runs},
                              overwrite=True)
            bar.advance(task)
            if model is not teacher:
                del model

    dense = by_name["dense"]
    untrained, trained = by_name[f"sla {k_last:g} + fp8"], by_name["qat"]
    summary = {"dense_abs_rel": dense.get("abs_rel"), "untrained_abs_rel": untrained.get("abs_rel"),
               "trained_abs_rel": trained.get("abs_rel")}
    if all(isinstance(v, float) for v in summary.values()):
        lost = untrained["abs_rel"] - dense["abs_rel"]
        summary["abs_rel_recovered"] = (untrained["abs_rel"] - trained["abs_rel"]) / lost if lost > 0 else None
        summary["trained_abs_rel_rel_gap"] = trained["abs_rel"] / dense["abs_rel"] - 1
    if "auc30" in dense:
        summary["trained_auc30_gap_points"] = 100 * (dense["auc30"] - trained["auc30"])
    result = {"config": cfg.to_json(), "tokens": tokens, "key_blocks": blocks,
              "kept_blocks": {**{f"{k:g}": min(blocks, max(1, math.ceil(k * blocks))) for k in cfg.topks},
                              **{f"{b} blocks": min(b, blocks) for b in cfg.kept_blocks}},
              "scenes": n, "device": str(device), "rows": rows, "summary": summary, "runs": runs}
    atomic_write_json(out / "study.json", result, overwrite=True)
    atomic_write_bytes(out / "study.png", _plot(rows, cfg, tokens, blocks), overwrite=True)
    (out / "study.partial.json").unlink(missing_ok=True)
    con.print(_table(rows, cfg, n))
    con.print(f"wrote {out}/study.json and study.png")
    return result


def _resumed(cfg: StudyConfig, out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(rows by name, training runs) of the stopped study in `out`, checked to be this config's."""
    import json

    path = out / "study.partial.json"
    if not path.is_file():
        raise MissingInput(f"--resume: {path} not found (no stopped study in {out}; run without --resume)")
    try:
        partial = json.loads(path.read_text())
        rows, runs, config = partial["rows"], partial["runs"], partial["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInput(f"--resume: {path} is not a study's partial file ({e})") from None
    now = cfg.to_json()
    diff = sorted(k for k in set(now) | set(config) if now.get(k) != config.get(k))
    if diff:
        raise InvalidInput(f"--resume: the study in {out} was made with other settings ("
                           + ", ".join(f"{k} {config.get(k)!r}, asked {now.get(k)!r}" for k in diff) + ")")
    return {r["row"]: r for r in rows}, dict(runs)


# ------------------------------------------------------------------------------------------------ presentation
def _table(rows: list[dict], cfg: StudyConfig, n: int):
    from rich.table import Table

    table = Table(title=f"{cfg.model}: quality vs SLA sparsity on {n} {cfg.dataset} scenes ({cfg.views} views, "
                        f"{cfg.size[0]}x{cfg.size[1]})")
    table.add_column("variant", no_wrap=True)
    table.add_column("topk", justify="right")
    table.add_column("trained")
    for k in METRICS:
        table.add_column(HEADERS[k], justify="right")
    for r in rows:
        table.add_row(r["row"], f"{r['topk']:g}", "yes" if r["trained"] else "",
                      *[f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in METRICS])
    return table


def _plot(rows: list[dict], cfg: StudyConfig, tokens: int, blocks: int) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["row"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "abs_rel", "AbsRel (lower is better)"), (axes[1], "auc30", "AUC@30 (higher)")):
        if key not in by["dense"]:
            ax.set_visible(False)
            continue
        for fp8, style in ((False, "o-"), (True, "s--")):
            xs = [k for k in cfg.topks]
            ys = [by[f"sla {k:g}" + (" + fp8" if fp8 else "")].get(key, math.nan) for k in xs]
            ax.plot(xs, ys, style, label="SLA untrained" + (" + FP8" if fp8 else ""))
        for fp8, marker in ((False, "D"), (True, "P")):
            counted = [r for r in rows if "kept_blocks" in r and r["fp8"] == fp8 and key in r]
            if counted:
                ax.plot([r["topk"] for r in counted], [r[key] for r in counted], marker, ls="none", ms=7,
                        label="SLA kept-block count untrained" + (" + FP8" if fp8 else ""))
        ax.axhline(by["dense"][key], color="k", lw=1, label="dense teacher")
        for name, marker in (("qat", "*"), ("distill only", "^"), ("task only", "v"), ("linear only", "x")):
            if name in by and key in by[name]:
                x = cfg.topks[-1] if name != "linear only" else cfg.topks[-1] * 0.8
                ax.plot([x], [by[name][key]], marker, ms=11 if marker == "*" else 8, ls="none",
                        label=name + (" (trained)" if by[name]["trained"] else ""))
        ax.set_xscale("log")
        ax.set_xlabel("kept fraction of key blocks (topk)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"lite3r study {cfg.model}: {tokens} global-attention tokens = {blocks} key blocks of {cfg.block}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(model: str, *, out: str | None = None, device: str | None = None, overwrite: bool = False,
         quiet: bool = False, resume: bool = False, **fields) -> dict:
    """The CLI's entry: `fields` are StudyConfig fields the user gave (None: not given)."""
    given = {k: v for k, v in fields.items() if v is not None}
    for key, cast, flag, example in (("topks", float, "--topk", "kept fractions like 0.3,0.1,0.05"),
                                     ("kept_blocks", int, "--kept-blocks", "counts like 4,8,16")):
        if isinstance(given.get(key), str):
            try:
                given[key] = tuple(cast(t) for t in given[key].split(",") if t.strip())
            except ValueError:
                raise InvalidInput(f"{flag} takes comma-separated {example}; got {given[key]!r}") from None
    if "size" in given and isinstance(given["size"], str):
        from lite3r_recon.train_config import parse_res

        given["size"] = parse_res(given["size"])
    cfg = StudyConfig(model=model, **given)
    return study(cfg, out or f"runs/study-{model}", device=device, overwrite=overwrite, quiet=quiet, resume=resume)


if __name__ == "__main__":
    main("vggt-tiny", scenes=2, train_steps=4, overwrite=True)
