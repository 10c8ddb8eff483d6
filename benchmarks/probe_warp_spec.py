"""Triton 3.6's Hopper warp specialisation on the streaming forward's loop (experiment, not used by the package).

``tl.range(..., warp_specialize=True)`` (its docstring says Blackwell only) runs a Hopper pass in
Triton 3.6: compiled for sm_90 with ``num_warps=4``, the class-tile loop splits into a producer
warp group (the TMA loads) and two consumer groups that each own half of the tile's rows, their
MMAs and their epilogue (max, sum-exp, target logit), so one group's epilogue can run beside
the other's MMAs. With 8 warps the pass leaves the loop whole.

Two miscompiles found on the way (session 9), both avoided here:
- a host ``TensorDescriptor`` keeps the whole row block in the launch's TMA descriptor
  (``metadata.tensordesc_meta``: 128 x 64) while each consumer's copy lands in a 64-row buffer:
  every launch of the production kernel warp-specialised ended in an illegal memory access.
  Descriptors made in the kernel (``tl.make_tensor_descriptor``) get the halved block;
- ``rows = r0 + tl.arange(0, BLOCK_N)`` with ``r0`` also the load's coordinate: the second
  consumer's rows are offset twice (``r0 + 64`` plus an arange from 64). Rows computed apart
  (int64, as production does) are right.

The kernels here, at the Gemma 2 head (forward only, bf16), each in its own process, lse and
target logit checked against a chunked torch reference:
- ``stats``: the class-tile loop with the rows' online max / sum-exp carried across tiles,
  stored after the loop (the production kernel's core);
- ``stats+target``: the same plus the target logit, ``sum_j [j == y_i] z_ij`` per tile.
Each with 8 warps (not split: the control, host descriptors) and with 4 (split, descriptors
made in the kernel), at 4, 1 and 2 programs per multiprocessor.

Session 9 (``probe_warp_spec.log``, H100): the warp-specialised loops run correctly but slower
(stats 16.6-18.3 ms against 16.3; with the target logit 18.2-19.3 against 16.6). The production
kernel warp-specialised the same way (tree bad037b: a ``WARP_SPECIALIZE`` constexpr, swept by
that tree's ``benchmarks/tune_warp_spec.py``, ``tune_warp_spec.log``) was slower at Gemma 2
(17.7-18.0 ms at best against 17.1-17.2) and Llama 3 (15.3-15.5 against 14.3-14.8), faster only
at 1M classes (10.3-10.5 against 10.7, 128 x 128 tiles); reverted.

    PYTHONPATH=. python benchmarks/probe_warp_spec.py [--quick]
"""

import argparse
import json
import math
import subprocess
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def stats_kernel(
    X, W, x_desc, w_desc, Y, M_out, S_out, L_out, N, C, D, tiles_per_split,
    TARGET: tl.constexpr, WS: tl.constexpr, DEVICE_DESC: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    if DEVICE_DESC:  # descriptors made in the kernel (global scratch from triton.set_allocator)
        x_desc = tl.make_tensor_descriptor(X, shape=[N, D], strides=[D, 1], block_shape=[BLOCK_N, BLOCK_D])
        w_desc = tl.make_tensor_descriptor(W, shape=[C, D], strides=[D, 1], block_shape=[BLOCK_C, BLOCK_D])
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = pid_n * BLOCK_N
    # rows apart from r0 (int64, as production): with ``r0 + arange`` the pass offsets the
    # second consumer's rows twice (r0 + 64 and an arange from 64; Triton 3.6)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    lin = tl.zeros([BLOCK_N], dtype=tl.float32)
    if TARGET:
        y = tl.load(Y + rows, mask=rows < N, other=-1).to(tl.int32)
    c_first = pid_s * tiles_per_split * BLOCK_C
    n_t = tl.minimum(tiles_per_split, tl.cdiv(C - c_first, BLOCK_C))
    for t in tl.range(0, n_t, warp_specialize=WS):
        c0 = c_first + t * BLOCK_C
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(D, BLOCK_D), num_stages=STAGES):
            a = x_desc.load([r0, k * BLOCK_D])
            b = w_desc.load([c0, k * BLOCK_D])
            acc = tl.dot(a, b.T, acc)
        cols = c0 + tl.arange(0, BLOCK_C)
        zm = tl.where((cols < C)[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m = m_new
        if TARGET:
            lin += tl.sum(tl.where(cols[None, :] == y[:, None], acc, 0.0), axis=1)
    out = pid_s * N + rows
    tl.store(M_out + out, m, mask=rows < N)
    tl.store(S_out + out, s, mask=rows < N)
    tl.store(L_out + out, lin, mask=rows < N)


def _inputs(quick: bool):
    N, D, C = (1024, 256, 20000) if quick else (8192, 2304, 256000)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D)).bfloat16()
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    return x, w, y


def _reference(x, w, y):
    lse = torch.empty(x.shape[0], device="cuda")
    zy = torch.empty(x.shape[0], device="cuda")
    for r0 in range(0, x.shape[0], 1024):
        z = x[r0 : r0 + 1024].float() @ w.float().T  # fp32 products, as the kernels accumulate
        lse[r0 : r0 + 1024] = torch.logsumexp(z, dim=1)
        zy[r0 : r0 + 1024] = z.gather(1, y[r0 : r0 + 1024, None])[:, 0]
    return lse, zy


def run_one(kind: str, warps: int, per_sm: int, quick: bool) -> dict:
    x, w, y = _inputs(quick)
    N, D = x.shape
    C = w.shape[0]
    ws = warps == 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bn, bc, bd = 128, 256, 64
    n_rb, n_tiles = triton.cdiv(N, bn), triton.cdiv(C, bc)
    per = triton.cdiv(n_tiles, max(1, triton.cdiv(per_sm * sms, n_rb)))
    splits = triton.cdiv(n_tiles, per)
    if ws:  # descriptors made in the kernel (host ones keep X's whole block: see the module text)
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        x_desc, w_desc = x, w
    else:
        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bn, bd])
        w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bc, bd])

    def fn():
        part = torch.empty((3, splits, N), device="cuda")
        stats_kernel[(n_rb, splits)](
            x, w, x_desc, w_desc, y, part[0], part[1], part[2], N, C, D, per, TARGET=kind == "stats+target",
            WS=ws, DEVICE_DESC=ws, STAGES=3, BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps,
        )  # fmt: skip
        m, s, lin = part
        m_max = m.max(0).values
        return m_max + torch.log((s * torch.exp(m - m_max)).sum(0)), lin.sum(0)

    lse, lin = fn()
    torch.cuda.synchronize()
    ref_lse, ref_zy = _reference(x, w, y)
    out = dict(lse_err=((lse - ref_lse).abs().max() / ref_lse.abs().max()).item())
    if kind != "stats":
        out["target_err"] = ((lin - ref_zy).abs().max() / ref_zy.abs().max()).item()
    out["ms"] = do_bench(fn, warmup=25, rep=200, return_mode="median")
    out["tflops"] = 2 * N * D * C / out["ms"] / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "WARPS", "PER_SM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, warps, per_sm = args.one
        print(json.dumps(run_one(kind, int(warps), int(per_sm), args.quick)))
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for kind in ("stats", "stats+target"):
        for warps, per_sm in ((8, 4), (4, 1), (4, 2)):
            cmd = [sys.executable, __file__, "--one", kind, str(warps), str(per_sm)]
            cmd += ["--quick"] if args.quick else []
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            lines = proc.stdout.strip().splitlines()
            try:
                res = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                res = dict(error=f"rc {proc.returncode}: {err[:150]}")
            rows.append((kind, warps, per_sm, res))
            print(kind, warps, per_sm, res, flush=True)
    print("\n| kernel | warps | programs / SM | ms | TFLOP/s | lse err | target err |")
    print("|---|---|---|---|---|---|---|")
    for kind, warps, per_sm, r in rows:
        if "error" in r:
            print(f"| {kind} | {warps} | {per_sm} | {r['error']} ||||")
        else:
            t = r.get("target_err")
            print(f"| {kind} | {warps} | {per_sm} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['lse_err']:.1e} | "
                  f"{'' if t is None else f'{t:.1e}'} |")  # fmt: skip


if __name__ == "__main__":
    main()
