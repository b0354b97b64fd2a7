"""Pose probe (docs/quality.md, session 8): does a vggt-tiny camera head learn relative pose, and from what?

    python benchmarks/quality/pose_probe.py --views 2 --arc 90,200 --batch 32 --steps 300 --wdepth 0 --wpoint 0 [--sky compass]
        [--fixed]    every scene has scene 11's content (only the cameras vary): relative pose = a comparison of views
        [--oracle]   scene 11's content and view 0 at azimuth 0: view 1's image alone gives the relative pose
        [--ls X] [--tok X]   LayerScale gammas / special tokens (camera, register) set to X at init
        [--wtrack X] the tracking loss at weight X (exact tracks of view-0 pixels: a correspondence signal)
        [--device cuda] [--minutes M]   train on a GPU; stop after M minutes (the schedule stays --steps long)

Trains lite3r pretrain's Pretrainer on fresh scenes (CPU) and prints, every 100 steps, the correlation and spread of the
predicted vs true relative rotation angle (view 0 to the others) on held-out scenes of the same distribution, and
on a fresh training-distribution batch. A head sitting at the mean pose shows a spread far below the truth's.
"""
import argparse
import time

import numpy as np
import torch

from lite3r_cli.pretrain import PretrainConfig, Pretrainer
from lite3r_recon.synthetic import render_batch
from lite3r_backbones.cameras import normalize_scene, vggt_pose_encoding
p = argparse.ArgumentParser()
p.add_argument("--views", type=int, default=2)
p.add_argument("--arc", default="10,60")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--res", default="56,70")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--wcam", type=float, default=5)
p.add_argument("--wdepth", type=float, default=1)
p.add_argument("--wpoint", type=float, default=1)
p.add_argument("--wtrack", type=float, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--minutes", type=float, default=0)
p.add_argument("--eval", type=int, default=32)
p.add_argument("--ls", type=float, default=0)
p.add_argument("--tok", type=float, default=0)
p.add_argument("--sky", default="plain")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--save", default=None, help="write the model's state dict here at the end")
p.add_argument("--load", default=None, help="start from this state dict (a curriculum: --fixed first, then not)")
p.add_argument("--fixed", action="store_true")
p.add_argument("--pool", type=int, default=0, help="like --fixed, the content drawn from a pool of this many scenes")
p.add_argument("--oracle", action="store_true")
a = p.parse_args()
if a.fixed or a.pool:
    import dataclasses, lite3r_recon.synthetic as syn
    _orig = syn.make_scene
    def fixed_scene(seed, views=16, size=518, **kw):
        content = 11 + 1000 * (seed % a.pool) if a.pool else 11
        sc, base = _orig(seed, views, size, **kw), _orig(content, views, size, **kw)
        return dataclasses.replace(sc, primitives=base.primitives, light=base.light)
    syn.make_scene = fixed_scene
if a.oracle:  # fixed scene, view 0 fixed, only the span varies: view 1's image alone gives the relative pose
    import dataclasses, math, numpy as np, lite3r_recon.synthetic as syn
    _orig = syn.make_scene
    def oracle_scene(seed, views=16, size=518, arc=(90, 200), **kw):
        base = _orig(11, views, size, **kw)
        rng = np.random.default_rng(seed & 0xFFFFFFFF)
        span = math.radians(rng.uniform(*arc))
        E = []
        for i in range(views):
            az = span * i / max(views - 1, 1)
            c = 4.8 * np.array([math.cos(0.45) * math.cos(az), math.cos(0.45) * math.sin(az), math.sin(0.45)])
            E.append(syn.look_at(c, np.array([0, 0, 0.3])))
        return dataclasses.replace(base, extrinsics=np.stack(E))
    syn.make_scene = oracle_scene
torch.set_num_threads(a.threads)
arc = tuple(float(x) for x in a.arc.split(",")); res = tuple(int(x) for x in a.res.split(","))
cfg = PretrainConfig(views=a.views, res=res, batch=a.batch, lr=a.lr, warmup=50, steps=a.steps, eval_scenes=0,
                     arc=arc, sky=a.sky, w_camera=a.wcam, w_depth=a.wdepth, w_point=a.wpoint, w_track=a.wtrack)
dev = torch.device(a.device)
tr = Pretrainer(cfg, dev)
if a.load:
    tr.model.load_state_dict(torch.load(a.load))
if a.tok:
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for q in (tr.model.aggregator.camera_token, tr.model.aggregator.register_token):
            q.copy_(torch.randn(q.shape, generator=g) * a.tok)
if a.ls:
    with torch.no_grad():
        for n, q in tr.model.named_parameters():
            if n.endswith(".gamma"): q.fill_(a.ls)
held = render_batch([2**31 + 7919 * k for k in range(a.eval)], a.views, res, device=dev, arc=arc, sky=a.sky)
def angles(q):  # quaternion xyzw [.., 4] -> rotation angle deg
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.rad2deg(2 * torch.acos(q[..., 3].abs().clamp(max=1)))
gt = normalize_scene(held["extrinsics"], held["intrinsics"], held["depth"], held["mask"])
enc = vggt_pose_encoding(gt["extrinsics"], gt["intrinsics"], res)
true = angles(enc[:, 1:, 3:7]).flatten()
def ev_batch(b):
    g = normalize_scene(b["extrinsics"], b["intrinsics"], b["depth"], b["mask"])
    e = vggt_pose_encoding(g["extrinsics"], g["intrinsics"], res)
    with torch.no_grad():
        pe = tr.model(b["images"])["pose_enc"]
    t, pr = angles(e[:, 1:, 3:7]).flatten().cpu(), angles(pe[:, 1:, 3:7]).flatten().float().cpu()
    return float(np.corrcoef(pr.numpy(), t.numpy())[0, 1]), float(pr.std()), float(t.std())
def ev():
    tb = ev_batch(tr.batch(a.steps + 7))
    print("  train-dist batch (train mode): corr %.2f pred std %.1f true std %.1f" % tb)
    tr.model.eval()
    with torch.no_grad():
        pe = tr.model(held["images"])["pose_enc"]
    tr.model.train()
    pred = angles(pe[:, 1:, 3:7]).flatten().float()
    c = float(np.corrcoef(pred.cpu().numpy(), true.cpu().numpy())[0, 1])
    return c, float(pred.std()), float(true.std()), float((pred - true).abs().mean()), float((pe[:, 1:, :3]-enc[:, 1:, :3]).abs().mean())
t0 = time.time()
for s in range(a.steps):
    o = tr.step(s)
    if a.minutes and time.time() - t0 > 60 * a.minutes:
        c, ps, ts, err, terr = ev()
        print(f"{s+1} {time.time()-t0:.0f}s (time up) held corr {c:.2f} pred std {ps:.1f} |err| {err:.1f} deg", flush=True)
        break
    if (s + 1) % 100 == 0 or s == 0:
        c, ps, ts, err, terr = ev()
        print(f"{s+1} {time.time()-t0:.0f}s cam {o['camera']:.3f} depth {o.get('depth', 0):.3f} | held corr {c:.2f} "
              f"pred std {ps:.1f} true std {ts:.1f} |err| {err:.1f} deg  T err {terr:.3f}"
              + (f" track {o['track']:.3f}" if "track" in o else ""), flush=True)
if a.save:
    torch.save(tr.model.state_dict(), a.save)
