"""python -m lite3r_backbones [../shared/reference]: error of bf16 vs fp32 VGGT heads on the VGGT-1B parity input."""
import gc
import importlib.util
import sys

from safetensors.torch import load_file

from . import build_backbone, load_checkpoint
from .vggt import head_dtype_error

ref = sys.argv[1] if len(sys.argv) > 1 else "../shared/reference"
spec = importlib.util.spec_from_file_location("weights_recipe", f"{ref}/weights_recipe.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
model = build_backbone("vggt-1b", device="meta")
sd = recipe.recipe_state_dict(f"{ref}/vggt_1b_state_dict_manifest.json")
load_checkpoint(model, sd, skip_prefixes=model.optional_checkpoint_prefixes)
del sd
gc.collect()
images = load_file(f"{ref}/vggt_parity_2x196x280.safetensors")["images"]
for k, (rms, mx) in head_dtype_error(model.eval(), images).items():
    print(f"{k:18s} bf16 heads vs fp32: rms {rms:.1e} x std, max {mx:.1e} x std")
