"""One QAT step of VGGT-1B (recipe weights) at 8 views of 518x518 with its teacher: step time + peak memory.

../shared does not travel to the GPU machine: copy weights_recipe.py and vggt_1b_state_dict_manifest.json from
../shared/reference into the git-ignored .cache/gputrain/ and carry it, then on the GPU machine, from the repo root:
    LITE3R_RECIPE_DIR=.cache/gputrain LITE3R_TYPECHECK=0 python benchmarks/gpu_qat_step.py OUT.json
QAT_TINY=1 runs the same script on CPU with the tiny model (a dry run)."""
import faulthandler, json, os, sys, time, traceback
import torch
faulthandler.dump_traceback_later(60, repeat=True)  # a stack every minute: where a slow step spends its time
HERE = os.environ.get("LITE3R_RECIPE_DIR", ".cache/gputrain")
sys.path.insert(0, HERE)
sys.path.insert(0, os.getcwd())
from weights_recipe import recipe_state_dict
from safetensors.torch import save_file

TINY = os.environ.get("QAT_TINY") == "1"  # CPU dry run of this script
t0 = time.time()
from lite3r_recon import models as RM
from lite3r_recon.qat import QAT, TrainConfig
from lite3r_recon.models import enable_activation_checkpointing
from lite3r_recon.runs import Dist
if not TINY:  # the recipe state dict in memory (no 4.8 GB file round trip), loaded strictly on a meta-built model
    from lite3r_backbones import build_backbone, load_checkpoint
    recipe = recipe_state_dict(os.path.join(HERE, "vggt_1b_state_dict_manifest.json"))
    print(f"recipe weights built in {time.time() - t0:.0f} s", flush=True)
    def _recipe_model(name, weights=None, seed=0, device=None):
        model = build_backbone(name, device="meta")
        return load_checkpoint(model, recipe, strict=True, skip_prefixes=model.optional_checkpoint_prefixes)
    RM.dense_model = _recipe_model

res = {"gpu": torch.cuda.get_device_name() if not TINY else "cpu", "torch": torch.__version__,
       "backend": os.environ.get("LITE3R_BACKEND", "auto")}
dev = torch.device("cpu" if TINY else "cuda")
if TINY:
    torch.cuda.synchronize = lambda: None
    torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda: 0
    torch.cuda.reset_peak_memory_stats = torch.cuda.empty_cache = lambda: None
t0 = time.time()
cfg = (TrainConfig(model="vggt", size="full", views=8, batch=1, res=(518, 518), eval_scenes=0, target="teacher",
                   steps=100, warmup=1) if not TINY else
       TrainConfig(views=2, batch=1, res=(56, 70), eval_scenes=0, target="teacher", steps=100, warmup=1))
q = QAT(cfg, Dist(device=dev))
torch.cuda.synchronize()
res.update(build_s=round(time.time() - t0, 1), trainable=q.n_trainable, total=q.n_total,
           attention_swapped=q.report.attention_swapped, linear_swapped=q.report.linear_swapped,
           weights_gib=round(torch.cuda.memory_allocated() / 2**30, 2))
print(res, flush=True)
if not TINY:
    del recipe
g = torch.Generator(device=dev).manual_seed(0)
S, (H, W) = cfg.views, cfg.res
batch = {"images": torch.rand(1, S, 3, H, W, device=dev, generator=g),
         "depth": torch.ones(1, S, H, W, device=dev), "mask": torch.ones(1, S, H, W, dtype=torch.bool, device=dev),
         "extrinsics": torch.eye(3, 4, device=dev).expand(1, S, 3, 4).clone(),
         "intrinsics": torch.tensor([[500., 0, W / 2], [0, 500., H / 2], [0, 0, 1]], device=dev).expand(1, S, 3, 3).clone()}

def measure(tag, n=1):
    out = {}
    try:
        torch.cuda.reset_peak_memory_stats()
        times, tf = [], []
        for i in range(n + 1):
            torch.cuda.synchronize(); a = time.perf_counter()
            q.teacher_forward(batch["images"])
            torch.cuda.synchronize(); b = time.perf_counter()
            terms = q.train_on(batch, i)
            torch.cuda.synchronize(); c = time.perf_counter()
            if i:
                times.append(c - b); tf.append(b - a)
            print(tag, i, round(c - b, 3), {k: round(v, 4) for k, v in terms.items()}, flush=True)
        out = {"step_s": sorted(times)[len(times) // 2], "step_s_all": [round(t, 3) for t in times],
               "teacher_fwd_s": sorted(tf)[len(tf) // 2],
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "last_terms": terms}
    except torch.OutOfMemoryError as e:
        out = {"oom": str(e).splitlines()[0], "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    except Exception as e:
        out = {"error": traceback.format_exc()[-2000:]}
    torch.cuda.empty_cache()
    print(tag, out, flush=True)
    return out

res["no_ckpt"] = measure("no_ckpt")
res["ckpt_blocks"] = enable_activation_checkpointing(q.student)
res["grad_ckpt"] = measure("grad_ckpt")
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps(res, indent=1))
