"""`lite3r export`: teacher (a checkpoint, or the backbone's default weights) -> student (a trained
`student.safetensors` with the SLA / FP8 settings it was trained with, or a fresh one from `topk` or `kept_blocks`,
`scope`, `fp8`) -> deployed on the CPU, uncompiled -> one artifact file (`lite3r_recon.models.save_artifact`). The
official VGGT-1B checkpoint loads as it is (strictly). Torch is imported inside, so the CLI reads the defaults
without loading it."""
from __future__ import annotations

import os


def export(student: str | os.PathLike | None = None, *, out: str | os.PathLike = "model.lite3r.safetensors",
           model: str = "vggt-tiny", weights=None, topk: float = 0.05,
           scope: str = "global", fp8: bool = True, overwrite: bool = False, kept_blocks: int | None = None) -> dict:
    """Write the artifact; returns its config (backbone, SLA modules and the SLAConfig, FP8 linear count)."""
    import lite3r
    from lite3r_recon import models
    from lite3r_recon.errors import InvalidInput
    from lite3r_recon.io import console, ensure_writable

    if scope not in ("global", "all"):
        raise InvalidInput(f"--scope must be global or all, got {scope!r}")
    models.check_backbone(model)
    try:
        config = lite3r.SLAConfig(topk=topk, scopes=("global",) if scope == "global" else None, kept_blocks=kept_blocks)
    except lite3r.Lite3rError as err:  # a bad --topk / --kept-blocks: one line
        raise InvalidInput(str(err)) from None
    ensure_writable(models.check_artifact_path(out), overwrite)  # before the (long) build
    note = models.weights_note(model, weights)
    if note:
        console().print(f"[yellow]{note}[/]")
    if student is not None:  # on the teacher it records (`weights`: where that checkpoint is now)
        built = models.load_student(student, weights=weights)
    else:  # a file, an in-memory state dict, or the default weights
        built = models.make_student(models.dense_model(model, weights), config, fp8=fp8, inplace=True)
    import torch

    deployed = models.deploy_model(built, dtype=torch.bfloat16, compile_mode=None)  # bf16 besides FP8 / fp32
    return models.save_artifact(deployed, out, overwrite=overwrite)

