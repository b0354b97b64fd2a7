"""The one door to every model lite3r builds, loads or saves - every command goes through here.

    teacher = dense_model("vggt-1b", "model.safetensors")          # strict; the official file loads as it is
    student = make_student(teacher, SLAConfig(topk=0.05), fp8=True)  # SLA + FP8 fake quant copy, only proj_l trains
    save_student(student, "run/student.safetensors", info)          # trained proj_l + the config it was built with
    student = load_student("run", "vggt-1b", weights="model.safetensors")
    model = deploy_model(student, device="cuda")                     # FP8 W8A8 linears, bf16 rest, compiled
    save_artifact(model, "vggt.lite3r.safetensors")                  # fp8 weights + scales + configs in one file
    model = load_artifact("vggt.lite3r.safetensors", device="cuda")  # no QAT model, no teacher file needed

`load_model` is what a command asks for: a dense backbone or, with `student`, the student trained from it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

import lite3r
from lite3r import SLAConfig
from lite3r_recon import deploy
from lite3r_recon.deploy import deploy_model  # noqa: F401  (part of the door: commands deploy through here)
from lite3r_recon.errors import InvalidInput, MismatchedKeys, MissingInput

ARTIFACT_FORMAT = "lite3r-deploy/1"
STUDENT_FORMAT = "lite3r-train/1"


# ------------------------------------------------------------------------------------------------------- dense
def dense_model(name: str, weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None, *, seed: int = 0,
                device: str | torch.device | None = None, overrides: Mapping | None = None) -> nn.Module:
    """Backbone `name` (with config `overrides`), eval and frozen: the checkpoint `weights` (a file or an in-memory
    state dict; built on the meta device, loaded strictly, the tensors straight to `device`; only what the backbone
    declares optional may be absent from the file), or the backbone's default weights (shipped for the tiny ones,
    else random ones drawn from `seed` without touching the global RNG: the same on every call). Where the weights
    came from is kept on the model (`lite3r_source`): a student saves it as its teacher's record (`teacher_of`)."""
    from lite3r_backbones import INFERENCE_FIELDS, build_backbone, load_checkpoint, shipped_weights

    device = torch.device(device or "cpu")
    overrides = dict(overrides or {})
    if weights is not None and not isinstance(weights, Mapping) and str(weights) == "random":
        weights, default = None, "random"
    else:
        default = None
    if weights is not None:
        if not isinstance(weights, Mapping) and not Path(weights).is_file():
            raise MissingInput(f"--weights {weights}: no such checkpoint file")
        model = build_backbone(name, device="meta", **overrides)
        load_checkpoint(model, weights, strict=True, device=device,
                        skip_prefixes=getattr(model, "optional_checkpoint_prefixes", ()))
        source = ({"kind": "state_dict"} if isinstance(weights, Mapping) else
                  {"kind": "checkpoint", "path": str(Path(weights).resolve())})
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = build_backbone(name, device=device, weights=default, **overrides)
        shipped = shipped_weights(name) if default is None and set(overrides) <= INFERENCE_FIELDS else None
        source = {"kind": "shipped", "name": shipped.name} if shipped else {"kind": "random", "seed": seed}
    model.lite3r_source = source
    return model.eval().requires_grad_(False)


def configure(model: nn.Module, **changes) -> nn.Module:
    """Set inference options of a backbone's frozen config (lean, head_dtype, ...) that its config has."""
    fields = {f.name for f in dataclasses.fields(model.config)}
    model.config = dataclasses.replace(model.config, **{k: v for k, v in changes.items() if k in fields})
    return model


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are emulated and slower than fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def infer(model: nn.Module, images: torch.Tensor, **inputs) -> dict:
    """The forward every command runs: inference mode, bf16 autocast on CUDA as the official demos run it (with
    bf16 weights it only keeps LayerNorm, softmax and reductions in fp32 and casts the fp32 images). `inputs`: the
    model's other arguments (VGGT query_points, DA3 extrinsics / intrinsics)."""
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                                enabled=compute_dtype(images.device) == torch.bfloat16):
        return model(images, **inputs)


def resolve_device(device: str | None) -> torch.device:
    """--device: None -> cuda when available, else cpu; a clear error for a bad name or a missing GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidInput(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"--device {device}: CUDA is not available on this machine")
    return dev


# ----------------------------------------------------------------------------------------------------- student
def make_student(teacher: nn.Module, config: SLAConfig = SLAConfig(), *, fp8: bool = True,
                 inplace: bool = False) -> nn.Module:
    """The QAT student of `teacher`: a copy (or the model itself with `inplace`) with SLA where `config` says, FP8
    fake quant on the linears when `fp8`, everything frozen but the zero-initialised proj_l. The config is kept
    on the student (`lite3r_sla_config`) and saved with it."""
    student = teacher if inplace else copy.deepcopy(teacher)
    n_attn = lite3r.convert_to_sla(student, config)
    if n_attn == 0:
        raise InvalidInput(f"no attention module of {getattr(teacher, 'name', type(teacher).__name__)} is in SLA scopes "
                         f"{config.scopes}: nothing would be sparse or trained")
    if fp8:
        lite3r.convert_to_fp8_qat(student)
    student.lite3r_report = lite3r.freeze_all_but_proj_l(student)
    bad = [n for n, p in student.named_parameters() if p.requires_grad and not is_proj_l(n)]
    if bad:
        raise RuntimeError(f"the swap left non-proj_l parameters trainable: {bad[:3]}")
    student.lite3r_sla_config = config.to_json()
    student.lite3r_fp8 = fp8
    return student


def is_proj_l(name: str) -> bool:
    """Whether parameter `name` belongs to an SLA proj_l (what DESIGN's QAT trains)."""
    return ".proj_l." in f".{name}"


def unfreeze_sla(student: nn.Module) -> None:
    """In place: every SLAAttention of `student` trains whole (its inherited qkv, q/k norms and proj besides its
    proj_l). Beyond DESIGN's recipe (proj_l alone): `lite3r train --trainable attention`, for students whose proj_l
    alone cannot recover what the sparse swap loses."""
    for m in student.modules():
        if isinstance(m, lite3r.SLAAttention):
            m.requires_grad_(True)


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


def load_proj_l(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy the trained parameters of a `student.safetensors` (proj_l weights and biases) into `model`, strictly:
    every tensor in the file must name a parameter of the model with the same shape."""
    from lite3r_backbones.checkpoint import read_safetensors

    tensors = read_safetensors(path, "safetensors student file")[1]
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise MismatchedKeys(f"{path}: {len(missing)} tensors name no parameter of the model, first {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if params[key].shape != value.shape:
                raise InvalidInput(f"{path}: {key} has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}")
            if not bool(torch.isfinite(value).all()):
                raise InvalidInput(f"{path}: {key} has NaN/inf values")
            params[key].copy_(value)
    return model


def save_student(student: nn.Module, path: str | os.PathLike, info: dict) -> None:
    """Write the trained proj_l tensors of `student` (keyed by parameter name) with `info` (backbone, training
    config), the SLAConfig and its teacher's record (`teacher_record`) in the safetensors header, and the same JSON
    beside it (`path` with .json)."""
    from safetensors.torch import save

    from lite3r_recon.io import atomic_write_bytes, atomic_write_text

    tensors = {n: p.detach().float().cpu().contiguous() for n, p in trainable(student).items()}
    info = {"format": STUDENT_FORMAT, **info, "params": sorted(tensors),
            "sla_config": getattr(student, "lite3r_sla_config", None), "fp8": getattr(student, "lite3r_fp8", None),
            "teacher_source": teacher_record(student)}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={"lite3r_train": json.dumps(info)}), overwrite=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1), overwrite=True)


def student_info(path: str | os.PathLike) -> tuple[Path, dict]:
    """(the student.safetensors file, its info JSON) for a file or the run directory holding it."""
    from lite3r_backbones.checkpoint import open_safetensors

    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.is_file():
        raise MissingInput(f"{path}: no such student file (lite3r train writes DIR/student.safetensors)")
    with open_safetensors(path, "safetensors student file") as f:
        meta = f.metadata() or {}
    meta_json = path.with_suffix(".json")
    if "lite3r_train" in meta:
        return path, _student_json(meta["lite3r_train"], f"{path} (its header)")
    if meta_json.is_file():
        return path, _student_json(meta_json.read_text(errors="replace"), str(meta_json))
    raise InvalidInput(f"{path}: no training config (neither safetensors metadata nor {meta_json.name})")


def _student_json(text: str, source: str) -> dict:
    """A student's info JSON, checked for what loading it reads: a corrupt one is one line naming where it was."""
    try:
        info = json.loads(text)
    except ValueError as err:
        raise InvalidInput(f"{source}: the student's training config is not valid JSON ({err})") from None
    if not (isinstance(info, dict) and isinstance(info.get("backbone"), str) and isinstance(info.get("params"), list)
            and (info.get("sla_config") or isinstance(info.get("config"), dict))):
        raise InvalidInput(f"{source}: not a lite3r student's training config (needs backbone, params and sla_config)")
    return info


def student_config(info: dict) -> tuple[SLAConfig, bool]:
    """The SLAConfig and fp8 flag a student was built with (files of older runs: from their training config)."""
    if info.get("sla_config"):
        return SLAConfig.from_json(info["sla_config"]), bool(info.get("fp8", True))
    from lite3r_recon.train_config import TrainConfig

    cfg = TrainConfig.from_json({**info["config"], "teacher": None, "data": None})
    return cfg.sla_config(), cfg.fp8


def load_student(path: str | os.PathLike, teacher: nn.Module | str | None = None, *,
                 weights: str | os.PathLike | None = None, device: str | torch.device | None = None) -> nn.Module:
    """A trained student from `student.safetensors` (or the run directory holding it) on its teacher.

    `teacher`: None or the backbone name the caller expects: the teacher the student records, rebuilt by
    `teacher_of` (`weights`: where that teacher's checkpoint is now); or a dense model (copied, left untouched),
    refused when it records other weights than the student's teacher. The SLA / FP8 settings come from the file;
    every trained tensor must name a parameter of the rebuilt student with the same shape, and every proj_l of the
    student must be in the file."""
    path, info = student_info(path)
    config, fp8 = student_config(info)
    if isinstance(teacher, str) and teacher != info["backbone"]:
        raise InvalidInput(f"{path} was trained on {info['backbone']}, not on {teacher}")
    built_here = teacher is None or isinstance(teacher, str)
    if built_here:
        teacher = teacher_of(path, weights=weights)
    name = getattr(teacher, "name", None)
    if name and name != info["backbone"]:
        raise InvalidInput(f"{path} was trained on {info['backbone']}, not on {name}")
    if not built_here and getattr(teacher, "lite3r_source", None) is not None:
        _check_teacher(path, _recorded_teacher(path, info), {**teacher.lite3r_source, "backbone": name})
    student = make_student(teacher, config, fp8=fp8, inplace=built_here)
    load_proj_l(student, path)
    missing = set(trainable(student)) - set(info["params"])
    if missing:
        raise MismatchedKeys(f"{path}: no tensor for {len(missing)} proj_l parameters, first {sorted(missing)[:3]}")
    return student.requires_grad_(False).to(device or "cpu")


def _sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:  # size + mtime: a changed file is hashed again
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_record(model: nn.Module) -> dict | None:
    """What a student saves of its teacher (from the dense model's `lite3r_source`): the backbone, its config
    overrides, and the weights - {"kind": "checkpoint", "path", "sha256"}, {"kind": "shipped", "name", "sha256"}
    (the backbone's shipped file), {"kind": "random", "seed"} or {"kind": "state_dict"} (in memory: not rebuildable).
    None for a model dense_model did not build."""
    from lite3r_backbones import get_config, shipped_weights

    source = getattr(model, "lite3r_source", None)
    name = getattr(model, "name", None)
    if source is None or name is None:
        return None
    record = dict(source)
    if source["kind"] == "checkpoint":
        record["sha256"] = _sha256(source["path"])
    elif source["kind"] == "shipped":
        record["sha256"] = _sha256(shipped_weights(name))
    default = dataclasses.asdict(get_config(name))
    config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(getattr(model, "config", None)) else {}
    record["backbone"] = name
    record["overrides"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
                           if k in default and k != "name" and v != default[k]}
    return record


def _describe(src: dict) -> str:
    kind = src["kind"]
    if kind == "checkpoint":
        return f"the checkpoint {src['path']}"
    if kind == "shipped":
        return f"the shipped {src.get('backbone', '')} weights ({src['name']})".replace("  ", " ")
    if kind == "random":
        return f"random weights from seed {src['seed']}"
    if kind == "default":
        return f"the backbone's default weights (shipped, else random from seed {src['seed']})"
    return "an in-memory state dict"


def _recorded_teacher(path: Path, info: dict) -> dict:
    """The teacher record of a student's info; students saved before records existed: rebuilt from their training
    config (its --teacher, else the default weights from its seed), with a warning that nothing is verified."""
    if info.get("teacher_source"):
        return info["teacher_source"]
    import warnings

    cfg = info.get("config") or {}
    ckpt = info.get("teacher") or cfg.get("teacher")
    src = ({"kind": "checkpoint", "path": ckpt} if ckpt else {"kind": "default", "seed": cfg.get("seed", 0)})
    warnings.warn(f"{path} records no teacher (saved by an older lite3r): using {_describe(src)} from its training "
                  f"config, unverified; pass its teacher with --weights if that is not it", stacklevel=3)
    return {**src, "backbone": info["backbone"], "overrides": {}}


def _check_teacher(path: Path, rec: dict, given: dict, *, flag: str = "the teacher") -> None:
    """Refuse teacher weights (`given`: a dense model's `lite3r_source` + its backbone) that are not the ones `rec`
    records: another file (by sha256), random weights from another seed, random for a checkpoint or the reverse."""
    g, r = given["kind"], rec["kind"]
    if "state_dict" in (g, r):
        return  # in memory: nothing to compare
    if g in ("checkpoint", "shipped"):
        if r in ("checkpoint", "shipped") and rec.get("sha256"):  # else a student of an older lite3r: unverified
            sha = _sha256(given["path"] if g == "checkpoint" else _shipped(given.get("backbone", ""), path))
            if sha != rec["sha256"]:
                raise InvalidInput(f"{flag} {_describe(given)} (sha256 {sha[:12]}) is not the teacher {path} was "
                                   f"trained from: {_describe(rec)} (sha256 {rec['sha256'][:12]}); pass that file "
                                   f"with --weights")
            return
        if r != "random":
            return
    elif r in ("random", "default") and rec["seed"] == given["seed"]:
        return
    raise InvalidInput(f"{flag} ({_describe(given)}) is not the teacher {path} was trained from: {_describe(rec)}"
                       + (" (drop --weights)" if r == "random" else "; pass it with --weights"))


def _shipped(name: str, path: Path) -> Path:
    from lite3r_backbones import shipped_weights

    shipped = shipped_weights(name) if name else None
    if shipped is None:
        raise InvalidInput(f"{path}: its teacher was the shipped weights of {name!r}, which has none now")
    return shipped


def teacher_of(student: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """The dense teacher a student (its file or run folder, or the deploy artifact exported from it) was trained
    from, rebuilt exactly from its record (`teacher_record`: backbone, config overrides, the checkpoint / shipped
    file by sha256, or the random seed), or a one-line refusal: the checkpoint moved or changed, the shipped weights
    changed. `weights`: where the teacher's checkpoint is now (it must hash to the recorded sha256), or "random"
    for a student of random weights."""
    if is_artifact(student):
        path, config = Path(student), read_artifact_config(student)
        info = {"backbone": config["backbone"], "teacher_source": config.get("teacher_source")}
    else:
        path, info = student_info(student)
    rec = _recorded_teacher(path, info)
    name = rec.get("backbone") or info["backbone"]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.get("overrides", {}).items()}
    kind = rec["kind"]
    if weights is not None and str(weights) != "random":
        if not Path(weights).is_file():
            raise MissingInput(f"--weights {weights}: no such checkpoint file")
        _check_teacher(path, rec, {"kind": "checkpoint", "path": str(weights)}, flag="--weights")
        return dense_model(name, weights, overrides=overrides, device=device)
    if weights is not None:  # "random"
        if kind not in ("random", "default"):
            raise InvalidInput(f"--weights random: {path} was trained from {_describe(rec)}, not random weights")
        return dense_model(name, "random", seed=rec["seed"], overrides=overrides, device=device)
    if kind == "checkpoint":
        ckpt = Path(rec["path"])
        if not ckpt.is_file():
            raise MissingInput(f"{path}: its teacher checkpoint {ckpt} is gone (moved or deleted); pass it with "
                               f"--weights FILE (sha256 {rec.get('sha256', '?')[:12]})")
        if rec.get("sha256") and _sha256(ckpt) != rec["sha256"]:
            raise InvalidInput(f"{path}: its teacher checkpoint {ckpt} changed since training (sha256 "
                               f"{_sha256(ckpt)[:12]}, trained on {rec['sha256'][:12]}); pass the original with "
                               f"--weights FILE")
        return dense_model(name, ckpt, overrides=overrides, device=device)
    if kind == "shipped":
        now = _sha256(_shipped(name, path))
        if rec.get("sha256") and now != rec["sha256"]:
            raise InvalidInput(f"{path}: the shipped {name} weights changed since it was trained (sha256 {now[:12]}, "
                               f"trained on {rec['sha256'][:12]}); pass the teacher it was trained from with "
                               f"--weights FILE")
        return dense_model(name, None, overrides=overrides, device=device)
    if kind in ("random", "default"):
        return dense_model(name, "random" if kind == "random" else None, seed=rec["seed"], overrides=overrides,
                           device=device)
    raise InvalidInput(f"{path} was trained from an in-memory state dict, which it cannot rebuild: pass that "
                       f"teacher's checkpoint with --weights FILE")


def weights_note(name: str, weights: str | os.PathLike | None, *, flag: str = "--weights") -> str | None:
    """The line a command prints when it runs backbone `name` on random weights (no `flag` and none shipped, or
    `flag` random), so its numbers are not read as a model's; None otherwise."""
    from lite3r_backbones import shipped_weights

    if weights is not None and str(weights) != "random":
        return None
    if weights is None and shipped_weights(name) is not None:
        return None
    return (f"{name} runs on random weights ({f'{flag} random' if weights else f'none shipped, no {flag}'}): "
            f"a smoke test, not a model's results")


def check_backbone(name: str) -> str:
    """`name` if it is a registered backbone, else a one-line error listing them (what every command's --model is)."""
    from lite3r_backbones import list_backbones

    if name not in list_backbones():
        raise InvalidInput(f"--model {name!r}: unknown backbone; expected one of {', '.join(list_backbones())}")
    return name


def load_model(name: str, *, weights: str | os.PathLike | None = None, student: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """What a command runs: backbone `name` (checkpoint `weights`, or random weights from `seed`), or with
    `student` the lite3r student trained from it, or - `student` or `weights` a `lite3r export` file - that
    deployed artifact (`load_artifact`); eval, frozen, on `device`."""
    check_backbone(name)
    for flag, given in (("--student", student), ("--weights", weights)):
        if is_artifact(given):
            if student is not None and weights is not None:
                raise InvalidInput(f"{flag} {given} is a deploy artifact, a whole model: pass it alone (no --student "
                                   f"with --weights)")
            model = load_artifact(given, device=device)
            if model.name != name:
                raise InvalidInput(f"{flag} {given} is a {model.name} artifact, not {name}: pass --model {model.name}")
            return model
    if student is not None:
        return load_student(student, name, weights=weights, device=device).eval()
    return dense_model(name, weights, seed=seed).to(device)


# ---------------------------------------------------------------------------------------------------- artifact
def _sla_settings(model: nn.Module) -> dict:
    """The SLA modules of `model` and their settings: {fqn: {topk, kept_blocks, block_q, block_k, feature_map}}."""
    return {fqn: {k: getattr(m, k) for k in ("topk", "kept_blocks", "block_q", "block_k", "feature_map")}
            for fqn, m in model.named_modules() if isinstance(m, lite3r.SLAAttention)}


def artifact_config(model: nn.Module) -> dict:
    """Everything `load_artifact` needs besides the tensors: backbone name + config, SLA settings per module."""
    config = getattr(model, "config", None)
    return {
        "format": ARTIFACT_FORMAT,
        "backbone": getattr(model, "name", None),
        "backbone_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {},
        "sla": _sla_settings(model),
        "sla_config": getattr(model, "lite3r_sla_config", None),  # the SLAConfig the student was built with
        "teacher_source": teacher_record(model),  # what the student was trained from (teacher_of rebuilds it)
        "fp32_modules": [fqn for fqn, m in model.named_modules() if getattr(m, "lite3r_fp32", False)],
        "fp8_linears": sum(isinstance(m, lite3r.FP8Linear) for m in model.modules()),
        "dtype": str(getattr(model, "lite3r_dtype", torch.float32)).removeprefix("torch."),  # deploy_model's
    }


def save_artifact(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write the deployed (not compiled) model as one safetensors file: fp8 weights + fp32 scales + the rest in
    their deployed dtype, and the config JSON in the header metadata. Returns the config."""
    from lite3r_recon.io import atomic_save_safetensors

    check_artifact_path(path)
    model = getattr(model, "_orig_mod", model)
    config = artifact_config(model)
    if not config["backbone"]:
        raise InvalidInput("save_artifact needs a backbone model (with .name and .config) to rebuild it from the file")
    tensors = {k: v.clone() for k, v in model.state_dict().items()}  # clone: no two keys share storage
    atomic_save_safetensors(path, tensors, metadata={"lite3r": json.dumps(config)}, overwrite=overwrite)
    return config


def check_artifact_path(path: str | os.PathLike) -> Path:
    """An artifact's file name: safetensors, so nothing else (a .ply, a .pt) is written in that format."""
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise InvalidInput(f"--out {path}: a deploy artifact is one .safetensors file (e.g. model.lite3r.safetensors), "
                           f"not {path.suffix or 'a name without suffix'}")
    return path


def is_artifact(path: str | os.PathLike | None) -> bool:
    """`path` is a `lite3r export` file: a safetensors file with lite3r's deploy config in its header (a student
    file, a checkpoint, an unreadable file: False, for their own loaders to handle)."""
    from safetensors import safe_open

    if path is None or isinstance(path, Mapping) or str(path) == "random" or not Path(path).is_file():
        return False
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return "lite3r" in (f.metadata() or {})
    except Exception:  # not safetensors (a .pt checkpoint) or corrupt: not ours to judge here
        return False


def read_artifact_config(path: str | os.PathLike) -> dict:
    from lite3r_backbones.checkpoint import open_safetensors

    with open_safetensors(path, "lite3r deploy artifact") as f:
        meta = f.metadata() or {}
    if "lite3r" not in meta:
        raise InvalidInput(f"{path} is not a lite3r deploy artifact (no 'lite3r' config in its safetensors header)")
    config = json.loads(meta["lite3r"])
    if config.get("format") != ARTIFACT_FORMAT:
        raise InvalidInput(f"{path}: artifact format {config.get('format')!r}, this lite3r reads {ARTIFACT_FORMAT!r}")
    return config


def _skeleton(config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The deployed architecture of an artifact: backbone, SLA where it was, FP8Linear for every linear whose
    weight is float8 in the file, fp32 modules as they were, the rest in the file's dtype."""
    from lite3r_backbones import build_backbone

    fp8_linears = {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype ==
                   torch.float8_e4m3fn}
    sla = config["sla"]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config["backbone_config"].items() if k != "name"}
    model = build_backbone(config["backbone"], **overrides)
    if sla:  # each module as it was deployed (the per-module settings are what the kernels ran with)
        first = next(iter(sla.values()))
        lite3r.convert_to_sla(model, lite3r.SLAConfig(topk=lambda m, fqn: sla[fqn]["topk"], block_q=first["block_q"],
                                                      block_k=first["block_k"], feature_map=first["feature_map"],
                                                      kept_blocks=first.get("kept_blocks"),  # older files: none
                                                      scopes=None), filter=lambda m, fqn: fqn in sla)
    for fqn in fp8_linears:  # empty FP8Linear shells: nothing is quantised, the file holds the fp8 weights
        linear = model.get_submodule(fqn)
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, lite3r.FP8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device))
    for fqn in config["fp32_modules"]:
        deploy.run_in_fp32(model.get_submodule(fqn))
    fp32 = tuple(f + "." for f in config["fp32_modules"])
    dtypes = {v.dtype for k, v in tensors.items() if v.is_floating_point() and k.rsplit(".", 1)[0] not in fp8_linears
              and not k.startswith(fp32)}  # FP8Linear keeps its own dtypes (fp8 weight, fp32 scale and bias)
    if config.get("dtype"):
        dtypes = {getattr(torch, config["dtype"])}
    if len(dtypes) == 1:  # the deployed dtype, so that non-persistent buffers match the saved model's
        dtype = dtypes.pop()
        deploy.cast_floating(model, dtype, keep=lambda m, fqn: getattr(m, "lite3r_fp32", False))
        deploy.compute_in(model, dtype)  # takes fp32 inputs without the caller's autocast, as deploy_model's does
    lite3r.fuse_fp8_inputs(model)  # as deploy_model: a forward-time rewiring, nothing of it in the file
    return model


def load_artifact(path: str | os.PathLike, *, device: str | torch.device | None = None,
                  compile_mode: str | None = None, regional: bool = True) -> nn.Module:
    """Rebuild a deployed model from `save_artifact`'s file alone: backbone architecture, SLA where it was, FP8Linear
    for every linear whose weight is float8 in the file, then the file's tensors assigned as they are (bit-identical
    weights). No teacher checkpoint and no QAT training state is needed."""
    from safetensors.torch import load_file

    config = read_artifact_config(path)
    tensors = load_file(os.fspath(path))
    with torch.device("meta"):  # no memory, no random init, no quantisation: every tensor comes from the file
        model = _skeleton(config, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # non-persistent buffers: build for real
        model = _skeleton(config, tensors)
        model.load_state_dict(tensors, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.lite3r_sla_config = config.get("sla_config")
    if device is not None:
        model = model.to(device)
    fp8 = [m for m in model.modules() if isinstance(m, lite3r.FP8Linear)]
    if fp8:  # FP8Linear probes W8A8 support eagerly and only reads the answer while compiled
        lite3r._scaled_mm_ok(fp8[0].weight.device)
    if compile_mode:
        model = deploy.compile_model(model, mode=compile_mode, regional=regional)
    return model
