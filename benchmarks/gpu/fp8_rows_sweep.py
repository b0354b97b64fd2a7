"""Why the fused LayerNorm/GELU + per-row FP8 quantise kernel (kernels/fp8_fused.py) reaches only 0.5-1 TB/s on
the H200 (VGGT-1B, 32 views: rows [43968, 1024] LayerNorm and [43968, 4096] GELU, 0.27 ms a call), and which
variant is fastest.

    python benchmarks/gpu/fp8_rows_sweep.py [OUT.json] [--warps 1 2 4 8 16] [--rows 1 2 4 8]
    TRITON_INTERPRET=1 python benchmarks/gpu/fp8_rows_sweep.py --smoke /tmp/x.json   # CPU, tiny shapes, no timing

Times with triton.testing.do_bench (median ms; GB/s = (bytes read + bytes written) / time):
  (a) the current ops: the raw torch.ops.lite3r.* (the kernel alone) and the public functions (which add a host-side
      finiteness check of the scales: one more kernel and a sync per call);
  (b) ceilings: x.clone() and x.to(float8_e4m3fn);
  (c) _sweep_kernel, a copy of _op_fp8_rows_kernel with constexpr switches, for LN, GELU and quantise-only (OP 2,
      the arithmetic of fp8.py's _fp8_rows_kernel): every num_warps x ROWS rows per program (2D block
      [ROWS, BLOCK_C]); then, at the current config and at the fastest one of that grid: DIV 1 (x * (1 / scale),
      one reciprocal per row), DIV 2 (that plus one FMA correction: by Markstein's theorem the correctly rounded
      quotient, bar fp32 underflow that cannot change an fp8 code, so it is labelled exact), EVEN (no masks,
      n = BLOCK_C: C is a power of two and ROWS divides R here), and for LN the moments in one pass (sum and sum of
      squares in one tl.reduce, var = E[x^2] - mean^2).
Configs holding over MAX_PER_THREAD fp32 values a thread are skipped (they spill); the table shows each kernel's
registers and spills. Every variant's fp8 bytes and scales are compared with the current op's ("vs op") and, for
DIV / one-pass / EVEN, with the div_rn two-pass masked variant of the same layout ("vs base"). expect: 'exact' must give 0 (the script exits 1 otherwise);
'order' is LN at another layout, whose moments sum in another order (fp32 LN output, no rounding to absorb an ulp),
so a few codes on a rounding boundary may move; 'approx' is not bit-identical by construction.
"""
import argparse
import json
import sys
import time

import torch
import triton
import triton.language as tl

import lite3r_kernels
from lite3r_kernels import fp8_fused, interpreting
# The rounding helpers are imported, not copied, so the variants round exactly as the current kernel does, EMULATE
# included (the CPU interpreter truncates fp32 -> bf16 and mis-rounds fp8 casts).
from lite3r_kernels.fp8 import _to_e4m3
from lite3r_kernels.fp8_fused import _config, _round_to

LN, GELU, QUANT = 0, 1, 2
MAX_PER_THREAD = 128  # fp32 elements per thread above which a config would spill registers: skipped
EPS = 1e-6


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _sweep_kernel(X, W, B, Y, S, R, C, stride_x, stride_y, eps,
                  BLOCK_C: tl.constexpr, ROWS: tl.constexpr, OP: tl.constexpr, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, ROUND: tl.constexpr, EMULATE: tl.constexpr, RECIPROCAL: tl.constexpr,
                  DIV: tl.constexpr, ONE_PASS: tl.constexpr, EVEN: tl.constexpr):
    """_op_fp8_rows_kernel on ROWS rows per program. OP 0 LayerNorm, 1 GELU, 2 none (quantise only). DIV 0 div_rn,
    1 multiply by the row's reciprocal, 2 that plus an FMA correction. ONE_PASS: LN moments in one reduction.
    EVEN: no masks (C == BLOCK_C and R % ROWS == 0)."""
    o_r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    o_c = tl.arange(0, BLOCK_C)
    m_r = o_r < R
    m_c = o_c < C
    m = m_r[:, None] & m_c[None, :]
    p_x = X + o_r[:, None] * stride_x + o_c[None, :]
    if EVEN:
        b_x = tl.load(p_x).to(tl.float32)  # [ROWS, BC]
    else:
        b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    if OP == 0:  # LayerNorm over each row, moments in fp32
        if EVEN:
            n = tl.full([], BLOCK_C, tl.float32)  # saves the current kernel's reduction of the mask
        else:
            n = tl.sum(m_c.to(tl.float32), axis=0)
        if ONE_PASS:  # one reduction tree for both sums; not bit-identical (E[x^2] - mean^2 rounds differently)
            s1, s2 = tl.reduce((b_x, b_x * b_x), 1, _add2)
            mean = tl.math.div_rn(s1, n)
            var = tl.maximum(tl.math.div_rn(s2, n) - mean * mean, 0.0)
            b_d = b_x - mean[:, None]
            if not EVEN:
                b_d = tl.where(m_c[None, :], b_d, 0.0)
        else:  # as now: mean, then the centred sum of squares (two reductions, one after the other)
            mean = tl.math.div_rn(tl.sum(b_x, axis=1), n)
            b_d = b_x - mean[:, None]
            if not EVEN:
                b_d = tl.where(m_c[None, :], b_d, 0.0)
            var = tl.math.div_rn(tl.sum(b_d * b_d, axis=1), n)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn((var + eps).to(tl.float32)))
        b_y = b_d * rstd[:, None]
        if HAS_W:
            if EVEN:
                b_y = b_y * tl.load(W + o_c).to(tl.float32)[None, :]
            else:
                b_y = b_y * tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            if EVEN:
                b_y = b_y + tl.load(B + o_c).to(tl.float32)[None, :]
            else:
                b_y = b_y + tl.load(B + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    elif OP == 1:  # GELU, exact erf form (kept as is: the model needs erf)
        b_y = 0.5 * b_x * (1.0 + tl.math.erf(b_x * 0.7071067811865476))
    else:  # quantise only: fp8.py's _fp8_rows_kernel (ROUND 0)
        b_y = b_x
    b_y = _round_to(b_y, ROUND, EMULATE)
    if not EVEN:
        b_y = tl.where(m_c[None, :], b_y, 0.0)
    amax = tl.max(tl.where(b_y != b_y, float("inf"), tl.abs(b_y)), axis=1)  # [ROWS]; NaN -> inf
    if RECIPROCAL:  # torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
    else:
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if EVEN:
        tl.store(S + o_r, scale)
    else:
        tl.store(S + o_r, scale, mask=m_r)
    b_s = tl.broadcast_to(scale[:, None], [ROWS, BLOCK_C])
    if DIV == 0:  # as now: a correctly rounded division per element
        b_q = tl.math.div_rn(b_y, b_s)
    else:
        b_inv = tl.broadcast_to(tl.math.div_rn(1.0, scale)[:, None], [ROWS, BLOCK_C])  # one division per row
        b_q = b_y * b_inv
        if DIV == 2:  # the residual b_y - b_q * s is exact in an FMA; one step back gives the rounded quotient
            b_fix = tl.fma(tl.fma(-b_q, b_s, b_y), b_inv, b_q)
            b_q = tl.where(b_q == 0.0, b_q, b_fix)  # the FMAs turn -0.0 (GELU of x << 0) into +0.0: keep the sign
    b_q = _to_e4m3(tl.clamp(b_q, -448.0, 448.0), EMULATE)
    p_y = Y + o_r[:, None] * stride_y + o_c[None, :]
    if EVEN:
        tl.store(p_y, b_q)
    else:
        tl.store(p_y, b_q, mask=m)


def current_config(op: int, C: int) -> tuple[int, int]:
    """(warps, rows a program) the kernels launch rows of C columns with: kernels/fp8_fused.py's table for the fused
    ops, kernels/fp8.py's (1 warp up to 1024 columns, 1 row) for quantise-only. The current ops divide with
    _div_scale and drop the masks at power-of-two C: a variant computes what the op does, bit for bit, at the
    op's (warps, rows) whatever its div / even switches (LayerNorm sums its moments in another order elsewhere)."""
    block = triton.next_power_of_2(C)
    if op in (LN, GELU):
        return _config(op, block)
    return (1 if block <= 1024 else 4 if block <= 4096 else 8), 1


def launch(case: dict, *, warps: int, rows: int, div: int = 0, one_pass: bool = False, even: bool = False):
    x, w, b = case["x"], case["w"], case["b"]
    R, C = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((R, 1), device=x.device, dtype=torch.float32)
    k = _sweep_kernel[(triton.cdiv(R, rows),)](
        x, x if w is None else w, x if b is None else b, y, s, R, C, x.stride(0), y.stride(0), float(case["eps"]),
        BLOCK_C=triton.next_power_of_2(C), ROWS=rows, OP=case["op"], HAS_W=w is not None, HAS_B=b is not None,
        ROUND=case["round"], EMULATE=interpreting(), RECIPROCAL=x.is_cuda,  # as fp8_fused._launch sets them
        DIV=div, ONE_PASS=one_pass, EVEN=even, num_warps=warps)
    return y, s, k  # k: the compiled kernel on the GPU (registers, spills), None in the interpreter


def mismatches(a, b) -> tuple[int, int]:
    """(fp8 codes that differ, scales that differ), both compared bit for bit."""
    codes = int((a[0].view(torch.uint8) != b[0].view(torch.uint8)).sum())
    scales = int((a[1].reshape(-1).view(torch.int32) != b[1].reshape(-1).view(torch.int32)).sum())
    return codes, scales


def make_cases(R: int, c_ln: int, c_gelu: int, c_q: int, device: str) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16).to(device)

    x_ln, w, b = randn(R, c_ln, std=2.0, mean=0.5), randn(c_ln, std=0.1, mean=1.0), randn(c_ln, std=0.1)
    x_g, x_q = randn(R, c_gelu, std=2.0), randn(R, c_q, std=2.0)
    rnd = fp8_fused._ROUND
    return {
        # ln_dtype fp32 (autocast's LayerNorm): ROUND 0; GELU rounds to x's dtype (bf16): ROUND 1
        "ln": dict(op=LN, x=x_ln, w=w, b=b, eps=EPS, round=rnd[torch.float32],
                   raw=lambda: torch.ops.lite3r.layer_norm_fp8_rows(x_ln, w, b, EPS, torch.float32),
                   public=lambda: lite3r_kernels.layer_norm_fp8(x_ln, w, b, eps=EPS, ln_dtype=torch.float32)),
        "gelu": dict(op=GELU, x=x_g, w=None, b=None, eps=0.0, round=rnd[x_g.dtype],
                     raw=lambda: torch.ops.lite3r.gelu_fp8_rows(x_g),
                     public=lambda: lite3r_kernels.gelu_fp8(x_g)),
        "quant": dict(op=QUANT, x=x_q, w=None, b=None, eps=0.0, round=0,
                      raw=lambda: torch.ops.lite3r.fp8_quantize_rows(x_q),
                      public=lambda: lite3r_kernels.fp8_quantize(x_q, axis=-1)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", default="fp8_rows_sweep.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1), no timing")
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    if args.smoke != interpreting() or (not args.smoke and not torch.cuda.is_available()):
        sys.exit("run on a CUDA GPU, or with TRITON_INTERPRET=1 and --smoke on the CPU")
    t_start = time.time()
    device = "cpu" if args.smoke else "cuda"
    # R = 12: ROWS 8 leaves a partial last program (row masks); the real R = 43968 = 2^6 * 687
    cases = make_cases(12, 64, 256, 64, device) if args.smoke else make_cases(43968, 1024, 4096, 1024, device)
    timed = not args.smoke

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median") if timed else None

    results = []

    def record(op, kind, variant, nbytes, ms, **extra):
        gbps = None if ms is None else nbytes / ms / 1e6
        results.append(dict(op=op, kind=kind, variant=variant, bytes=nbytes, ms=ms, gbps=gbps, **extra))
        return results[-1]

    # (b) ceilings, one per input shape
    ceiling = {}
    for name, case in cases.items():
        x = case["x"]
        r = record(name, "ceiling", "x.clone()", 2 * x.numel() * x.element_size(), bench(lambda: x.clone()))
        ceiling[name] = r["gbps"]
        record(name, "ceiling", "x.to(float8_e4m3fn)", x.numel() * (x.element_size() + 1),
               bench(lambda: x.to(torch.float8_e4m3fn)))

    failures = []
    for name, case in cases.items():
        x = case["x"]
        R, C = x.shape
        block = triton.next_power_of_2(C)
        nbytes = x.numel() * (x.element_size() + 1) + R * 4  # read x, write fp8 codes and one fp32 scale a row
        nbytes += sum(t.numel() * t.element_size() for t in (case["w"], case["b"]) if t is not None)
        # (a) the current op: the raw op is the reference every variant is compared with
        ref = case["raw"]()
        record(name, "op", "torch.ops (kernel only)", nbytes, bench(case["raw"]))
        pub = case["public"]()
        codes, scales = mismatches(pub, ref)
        record(name, "op", "public fn (+ finite check)", nbytes, bench(case["public"]), mism_op=[codes, scales],
               expect="exact")
        w0, r0 = current_config(case["op"], C)
        base_out = {}  # (warps, rows) -> output of the div_rn two-pass variant, for the "vs base" counts

        def variant(warps, rows, div=0, one_pass=False, even=False):
            label = " ".join([f"w{warps} r{rows}"] + [f"div{div}"] * bool(div) + ["1pass"] * one_pass
                             + ["even"] * even)
            out = launch(case, warps=warps, rows=rows, div=div, one_pass=one_pass, even=even)
            if div == 1 or one_pass:
                expect = "approx"
            elif case["op"] == LN and (warps, rows) != (w0, r0):
                expect = "order"
            else:
                expect = "exact"
            m_op = mismatches(out, ref)
            m_base = None
            if (warps, rows) in base_out and (div or one_pass or even):
                m_base = mismatches(out, base_out[(warps, rows)])
            if not (div or one_pass or even):
                base_out[(warps, rows)] = out
            ms = bench(lambda: launch(case, warps=warps, rows=rows, div=div, one_pass=one_pass, even=even))
            regs, spills = getattr(out[2], "n_regs", None), getattr(out[2], "n_spills", None)
            r = record(name, "variant", label, nbytes, ms, warps=warps, rows=rows, div=div, one_pass=one_pass,
                       even=even, regs=regs, spills=spills, mism_op=list(m_op),
                       mism_base=None if m_base is None else list(m_base), expect=expect)
            if expect == "exact" and m_op != (0, 0):
                failures.append(r)
            return r

        # (i) + (ii) num_warps x rows per program, the current arithmetic
        grid = []
        for warps in args.warps:
            for rows in args.rows:
                if rows * block <= MAX_PER_THREAD * 32 * warps and rows <= R:
                    grid.append(variant(warps, rows))
        # (iii) + (iv) + no masks, at the current config and at the fastest of the grid (in --smoke, no timings:
        # the grid's last config, to run the switches on a 2D block)
        anchors = [(w0, r0)]
        if grid:
            best = min(grid, key=lambda r: r["ms"]) if timed else grid[-1]
            anchors.append((best["warps"], best["rows"]))
        even_ok = C == block
        for warps, rows in dict.fromkeys(anchors):
            if (warps, rows) not in base_out:
                variant(warps, rows)
            switches = [dict(div=1), dict(div=2)]
            if even_ok and R % rows == 0:
                switches += [dict(even=True), dict(div=1, even=True), dict(div=2, even=True)]
            if case["op"] == LN:
                switches += [dict(one_pass=True)] + ([dict(one_pass=True, div=2, even=True)]
                                                     if even_ok and R % rows == 0 else [])
            for sw in switches:
                variant(warps, rows, **sw)
        if timed:
            torch.cuda.synchronize()

    # the table
    def fmt(v, f):  # None: a dash as wide as the number
        return format(v, f) if v is not None else "-".rjust(int(f.split(".")[0].rstrip("df")))

    def fmt_m(m):
        return "-" if m is None else f"{m[0]}/{m[1]}"

    print(f"\n{'op':6} {'kind':8} {'variant':27} {'ms':>8} {'GB/s':>7} {'%clone':>6}  "
          f"{'codes/scales != op':>18} {'!= base':>9} {'regs':>4} {'spill':>5}  expect")
    for r in results:
        pct = None if r["gbps"] is None or not ceiling.get(r["op"]) else 100 * r["gbps"] / ceiling[r["op"]]
        flag = "  FAIL" if any(r is f for f in failures) else ""
        print(f"{r['op']:6} {r['kind']:8} {r['variant']:27} {fmt(r['ms'], '8.4f')} {fmt(r['gbps'], '7.0f')} "
              f"{fmt(pct, '6.0f')}  {fmt_m(r.get('mism_op')):>18} {fmt_m(r.get('mism_base')):>9} "
              f"{fmt(r.get('regs'), '4d')} {fmt(r.get('spills'), '5d')}  {r.get('expect', '')}{flag}")
    if timed:
        print()
        for name in cases:
            rows_ = [r for r in results if r["op"] == name]
            cur = next(r for r in rows_ if r["variant"] == "torch.ops (kernel only)")
            var = [r for r in rows_ if r["kind"] == "variant"]
            for what, pool in (("exact/order", [r for r in var if r["expect"] != "approx"]), ("any", var)):
                b = min(pool, key=lambda r: r["ms"])
                print(f"{name}: fastest {what:11} {b['variant']:22} {b['ms']:.4f} ms {b['gbps']:.0f} GB/s, "
                      f"{cur['ms'] / b['ms']:.2f}x the current op ({cur['ms']:.4f} ms)")
    elapsed = time.time() - t_start
    print(f"{len(results)} rows in {elapsed:.1f} s; {len(failures)} exact variant(s) with mismatches")
    meta = dict(device=torch.cuda.get_device_name() if timed else "cpu (TRITON_INTERPRET=1)",
                torch=torch.__version__, triton=triton.__version__, smoke=args.smoke, elapsed_s=elapsed,
                shapes={k: list(c["x"].shape) for k, c in cases.items()}, max_per_thread=MAX_PER_THREAD)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
