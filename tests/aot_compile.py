"""Compile the Triton kernels ahead of time for sm_80, sm_86 and sm_90, without a GPU.

The CPU interpreter runs the kernels' Python, not Triton's compiler: code the
compiler rejects (a plain global read in a kernel, an op with no GPU lowering,
a layout it cannot convert) would pass every interpreter test. This script
builds each kernel for a representative set of encodings, dtypes and head dims
exactly as a GPU launch would: posattn's own launchers run on CPU tensors with a
capturing launcher, and Triton's own binder turns each launch into the signature,
constexprs and divisibility specialisation it would compile (no hand-written
argument types: a new argument is typed by its value). Shared memory must fit the
architecture. On sm_90 the half-precision attention kernels must also use wgmma,
compile with the launch's 16-byte specialisation, and (forward or decoding, D <= 128)
not spill: hopper_checks. Run it without TRITON_INTERPRET
(the kernels must be JIT functions, not interpreted ones); tests/test_aot_compile.py does.

    python tests/aot_compile.py [--quick] [--only=ENC/DTYPE/D[@ARCH,...] ...]
"""
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import posattn

SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448}   # bytes of shared memory a block may use
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
B, HQ, HKV, N = 1, 2, 1, 160              # not a multiple of any block; GridBias window (16, 10)


def _problem(enc, dt, D):
    """posattn.attention's arguments for an encoding set (every parameter requires grad)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = r(B, HQ, N, D, dtype=dt), r(B, HKV, N, D, dtype=dt), r(B, HKV, N, D, dtype=dt)
    kw = {}
    if enc.startswith("decode"):   # 3 queries of 8 heads against 160 keys of 2 k/v heads: _attn_decode
        q, k, v = r(B, 8, 3, D, dtype=dt), r(B, 2, N, D, dtype=dt), r(B, 2, N, D, dtype=dt)
        kw = dict(causal=True, alibi_slopes=r(8), rel_bias=posattn.DistanceBias(r(8, 24), 15, 8),
                  bias=r(1, 8, 3, N, dtype=dt), softcap=20.0, sinks=r(8), dropout_p=0.1)
        if "shaw" in enc:   # one query head per program
            kw = dict(causal=True, rel_emb=posattn.RelativeEmbeddings(r(8, 9, D), r(8, 9, D), 4, r(8, D), r(8, D)))
        return q, k, v, kw
    if enc == "grid-long":   # 1000 tokens of a 26 x 40 window: the forward's 128x128 tiles, the table in vectors of 8
        q, k, v = r(B, HQ, 1000, D, dtype=dt), r(B, HKV, 1000, D, dtype=dt), r(B, HKV, 1000, D, dtype=dt)
        return q, k, v, dict(rel_bias=posattn.GridBias(r(51 * 79, HQ), (26, 40)))
    if enc == "grid-odd-long":   # 1300 tokens of a 37 x 37 window: 128x128 tiles, a line per query column
        q, k, v = r(B, HQ, 1300, D, dtype=dt), r(B, HKV, 1300, D, dtype=dt), r(B, HKV, 1300, D, dtype=dt)
        return q, k, v, dict(rel_bias=posattn.GridBias(r(73 * 73, HQ), (37, 37)))
    if enc == "swin":   # Swin's window attention: 49 tokens of a 7 x 7 window, its shifted-window mask as a bias
        q, k, v = r(B, HQ, 49, D, dtype=dt), r(B, HQ, 49, D, dtype=dt), r(B, HQ, 49, D, dtype=dt)
        return q, k, v, dict(rel_bias=posattn.GridBias(r(13 * 13, HQ), (7, 7)), bias=r(1, 1, 49, 49, dtype=dt))
    if enc == "causal+rope+alibi+table+bias":
        kw = dict(causal=True, rope=posattn.RoPE(), alibi_slopes=r(HQ), rel_bias=posattn.DistanceBias(r(HQ, 24), 15, 8),
                  bias=r(1, HQ, N, N, dtype=dt), kerple=posattn.KERPLE(r(HQ).abs().detach().requires_grad_(),
                                                                      r(HQ).abs().detach().requires_grad_()))
    elif enc == "window+pos+ropei+grid+mask+softcap+sinks+dropout":
        kw = dict(window=(40, 9), q_pos=torch.arange(N), k_pos=torch.arange(N),
                  rope=posattn.RoPE(dim=32, interleaved=True, sections=(8, 4, 4)),   # multi-axis RoPE
                  rope_pos=(torch.arange(N).expand(3, N) // torch.tensor([[1], [3], [7]]),) * 2,
                  rel_bias=posattn.GridBias(r(31 * 19, HQ), (16, 10)),
                  bias=torch.rand(N, N, generator=g) < 0.8, softcap=20.0, sinks=r(HQ), dropout_p=0.1)
    elif enc == "grid":   # GridBias at default positions: the forward's gather, d(table) in chunks
        kw = dict(rel_bias=posattn.GridBias(r(31 * 19, HQ), (16, 10)))
    elif enc == "alibi":   # ALiBi alone: its side tiles' column term as a K=16 step of q.k (D <= 64)
        kw = dict(alibi_slopes=r(HQ))
    elif enc == "bias":   # a bfloat16 dense bias alone: the forward's interior tiles take it as q.k's accumulator
        kw = dict(bias=r(1, HQ, N, N, dtype=dt))
    elif enc in ("grid-pow2", "causal+grid-pow2"):   # Ww = 16: the forward's tiles at compile-time key offsets
        kw = dict(causal=enc.startswith("causal"), rel_bias=posattn.GridBias(r(19 * 31, HQ), (10, 16)))
    elif enc == "varlen+causal+rope+alibi+table":   # packed sequences of 70, 0 and 90 rows (N in all)
        kw = dict(causal=True, rope=posattn.RoPE(), alibi_slopes=r(HQ), rel_bias=posattn.DistanceBias(r(HQ, 24), 15, 8),
                  varlen=(70, 0, 90))
    elif enc == "causal+shaw+xl":   # as Transformer-XL runs it: one k / v head per query head (GROUP = 1)
        k, v = r(B, HQ, N, D, dtype=dt), r(B, HQ, N, D, dtype=dt)
        kw = dict(causal=True, rel_emb=posattn.RelativeEmbeddings(r(HQ, 9, D), r(HQ, 9, D), 4, r(HQ, D), r(HQ, D)))
    elif enc == "window+shaw":   # aK / aV without u / w: their gradients corrected in dQ's pass
        kw = dict(window=(40, 9), rel_emb=posattn.RelativeEmbeddings(r(HQ, 9, D), r(HQ, 9, D), 4))
    elif enc != "plain":
        raise ValueError(enc)
    return q, k, v, kw


def launches(enc, dt, D, arch=90):
    """Every (kernel, args, kwargs) posattn's own host code launches for this problem,
    forward and backward (without and with the parameters' gradients), captured
    instead of run: the arguments a GPU launch gets."""
    from posattn import _triton, _validate
    q, k, v, kw = _problem(enc, dt, D)
    lens = kw.pop("varlen", None)
    p = _validate.check(q, k, v, **kw)
    if lens is not None:
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        p = p.replace(varlen=(cu, cu, max(lens), max(lens)))
    if p.dropout_p > 0:  # the seed posattn.attention draws per call
        p = p.replace(dropout_rng=torch.zeros(1, dtype=torch.int64))
    calls = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **k2: calls.append((self.kernel, a, k2))

    params = _triton._launch_params(p)
    if not _triton._fits_shared_memory(p, (arch // 10, arch % 10)):
        return []   # posattn refuses it there, saying why
    _triton.TARGET_ARCH = (arch // 10, arch % 10)   # the launch configuration of that architecture
    try:
        L = _triton._Launch(p, q, *params)
        out, lse, lse2 = _triton._forward(L, q, k, v, wrap=Capture)
        out, lse2 = torch.randn(out.shape).to(dt), torch.zeros(lse2.shape)
        L = _triton._Launch(p, q, *params, forward=False)   # as posattn/_op.py's backward builds it
        for want in (False, True):  # lse not differentiated (dlse None), as in training
            need = {n: want and t is not None and t.is_floating_point() for n, t in zip(_triton._PARAMS, params)}
            _triton._backward(L, q, k, v, out, lse2, torch.randn(out.shape).to(dt), None, need, wrap=Capture)
    finally:
        _triton.TARGET_ARCH = None
    return calls


def specialise(kernel, args, kwargs, arch):
    """What JITFunction.run hands triton.compile for this launch (signature, constexprs,
    divisibility attributes, options), from Triton's own binder, without a driver."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


ATTENTION = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_decode")
FORWARD = ("_attn_fwd", "_attn_decode")


def spill_stores(ptx, arch=90):
    """Bytes of spill stores ptxas reports for this PTX (Triton's own ptxas, sm_90a, with
    the line info Triton 3.6 asks for)."""
    import re
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name=sm_{arch}a", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return sum(map(int, found)) if found else None


def hopper_checks(kernel, name, enc, dt, D, ptx, attrs):
    """What must never come back on sm_90 (issue 11), for half-precision attention
    kernels: a loop without wgmma (HGMMA), a launch compiled without the 16-byte
    divisibility of q / k / v and their row strides, and any spill in a forward kernel
    at D <= 128 (the last ones, 4-12 B at D = 80 / 128 in Shaw, causal GridBias and Swin,
    went with kernels/forward.py's AGAIN, and causal Transformer-XL's 4 B with one k / v
    head per query head with _shaw_band's causal case: bench/NOTES.md).
    The spills are ptxas's for this PTX with the options Triton 3.6 (the GPU machine's)
    gives it; Triton 3.9 adds --regAllocOptLevel=2, under which the heaviest forwards
    spill more (bench/NOTES.md)."""
    if dt == "fp32" or kernel.__name__ not in ATTENTION:
        return []
    problems = []
    # (decoding's 16-row tiles are below wgmma's 64: mma.sync, and it is bound by K / V reads)
    if "wgmma.mma_async" not in ptx and name != "_attn_decode":
        problems.append("no wgmma (HGMMA) in the kernel")
    names = list(kernel.arg_names)
    for arg in ("Q", "K", "V", "sqm", "skn", "svn"):
        if ["tt.divisibility", 16] not in attrs.get((names.index(arg),), []):
            problems.append(f"{arg} compiled without 16-byte divisibility (no launch specialisation)")
    if name in FORWARD and D <= 128:
        spilled = spill_stores(ptx)
        if spilled is None:   # (ptxas failed, or its report changed: not a pass)
            problems.append("ptxas reported no spill figure")
        elif spilled:
            problems.append(f"{spilled} bytes of spill stores in the forward")
    return problems


def cases(quick, only=None):
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    dims = [64, 128] if quick else [64, 80, 128, 256]
    for enc in ENCODINGS:
        for dt in dtypes:
            for D in dims:
                if only is None or only(enc, dt, D):
                    yield enc, dt, D


ENCODINGS = ["plain", "alibi", "causal+rope+alibi+table+bias", "varlen+causal+rope+alibi+table", "window+pos+ropei+grid+mask+softcap+sinks+dropout", "grid", "grid-long", "grid-odd-long", "grid-pow2", "causal+grid-pow2", "bias", "swin", "causal+shaw+xl",
             "window+shaw", "decode+alibi+table+bias+softcap+sinks+dropout", "decode+shaw+xl"]


def compile_case(args):
    enc, dt, D, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out, seen = [], set()
    for kernel, a, kw in launches(enc, DTYPES[dt], D, arch):
        options, signature, constexprs, attrs = specialise(kernel, a, kw, arch)
        key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))))
        if key in seen:
            continue
        seen.add(key)
        name = kernel.__name__ + ("_delta" if kernel.__name__ == "_attn_bwd_dq" and kw.get("DELTA_PASS") else "")
        t = time.time()
        try:
            k = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=options.__dict__)
            shared = k.metadata.shared
            problems = [] if shared <= SHARED_LIMIT[arch] else [f"shared memory {shared} B > {SHARED_LIMIT[arch]}"]
            if arch == 90:
                problems += hopper_checks(kernel, name, enc, dt, D, k.asm["ptx"], attrs)
            out.append((name, enc, dt, D, arch, not problems,
                        "; ".join(problems) or f"shared {shared} B, {time.time() - t:.1f}s"))
        except Exception as e:  # report every failure, not only the first
            msg = str(e).strip().splitlines()
            out.append((name, enc, dt, D, arch, False, f"{type(e).__name__}: {msg[-1] if msg else ''}"))
    return out


def main(quick=False, workers=2, only=None, archs=(80, 86, 90)):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")
    jobs = [(enc, dt, D, arch) for enc, dt, D in cases(quick, only) for arch in archs
            if only is None or only(enc, dt, D, arch)]
    failures = 0
    with ProcessPoolExecutor(workers) as pool:
        for rows in pool.map(compile_case, jobs):
            for name, enc, dt, D, arch, ok, info in rows:
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {dt} D={D:<3} {enc:<30} {name:<18} {info}", flush=True)
    print(f"{failures} failed")
    return failures


if __name__ == "__main__":
    # --only=SUBSTRING of "enc/dt/D", optionally @ARCH,ARCH (default: every architecture)
    sel = [a.split("=", 1)[1].partition("@")[::2] for a in sys.argv if a.startswith("--only=")]

    def only(enc, dt, D, arch=None):
        return any(f"{enc}/{dt}/{D}".find(x) >= 0 and (arch is None or not at or str(arch) in at.split(","))
                   for x, at in sel)
    only = only if sel else None
    sys.exit(1 if main(quick="--quick" in sys.argv, only=only) else 0)
