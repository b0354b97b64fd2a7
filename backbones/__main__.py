"""python -m lite3r_backbones [../shared/reference] [vggt|da3]: on the parity input with the recipe weights, the
error of bf16 vs fp32 VGGT heads and, for both backbones, of FP8 kept layers (kept_fp8) vs bf16/fp32 ones."""
import gc
import importlib.util
import sys

from safetensors.torch import load_file

from . import build_backbone, load_checkpoint
from .kept import kept_fp8_error
from .vggt import head_dtype_error

ref = sys.argv[1] if len(sys.argv) > 1 else "../shared/reference"
which = sys.argv[2:] or ["vggt", "da3"]
spec = importlib.util.spec_from_file_location("weights_recipe", f"{ref}/weights_recipe.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
for family in which:
    name, manifest, extra = {"vggt": ("vggt-1b", "vggt_1b_state_dict_manifest.json", {}),
                             "da3": ("da3-large", "da3_large_state_dict_manifest_hub_prefix.json",
                                     {"normalize": False})}[family]
    model = build_backbone(name, device="meta", **extra)
    sd = recipe.recipe_state_dict(f"{ref}/{manifest}")
    load_checkpoint(model, sd, skip_prefixes=model.optional_checkpoint_prefixes)
    del sd
    gc.collect()
    images = load_file(f"{ref}/{family}_parity_2x196x280.safetensors")["images"]
    if family == "vggt":
        for k, (rms, mx) in head_dtype_error(model.eval(), images).items():
            print(f"{name} {k:18s} bf16 heads vs fp32: rms {rms:.1e} x std, max {mx:.1e} x std")
    for k, (rms, mx) in kept_fp8_error(model.eval(), images).items():
        print(f"{name} {k:18s} FP8 kept layers vs fp32: rms {rms:.1e} x std, max {mx:.1e} x std")
    del model
    gc.collect()
