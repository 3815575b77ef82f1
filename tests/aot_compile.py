"""Compile the Triton kernels ahead of time for sm_80 and sm_90, without a GPU.

The CPU interpreter runs the kernels' Python, not Triton's compiler: code the
compiler rejects (a plain global read in a kernel, an op with no GPU lowering,
a layout it cannot convert) would pass every interpreter test. This script
builds each kernel for a representative set of encodings, dtypes and head dims
with the launch configurations posattn uses on a GPU, and checks that shared
memory fits the architecture. Run it without TRITON_INTERPRET (the kernels must
be JIT functions, not interpreted ones); tests/test_aot_compile.py does.

    python tests/aot_compile.py [--quick]
"""
import inspect
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {80: 166912, 90: 232448}   # bytes of shared memory a block may use
POINTERS = set("Q K V Out Lse Lse2 QPos KPos InvFreq Slopes Table Bias AK AV U W DO DK DV DQ Delta DLse "
               "DSlope DTable DU DW DAKEnd DAVEnd DAK DAV DBias".split())
FLOAT_POINTERS = set("Lse Lse2 Delta DLse DSlope DTable DU DW DAKEnd DAVEnd DAK DAV DBias InvFreq Slopes "
                     "Table AK AV U W".split())
FLOATS = {"qk_scale", "rope_factor", "sm_scale"}

NONE = dict(CAUSAL=False, HAS_WL=False, HAS_WR=False, HAS_POS=False, ROPE=False, ROT_DIM=0, INTERLEAVED=False,
            ALIBI=False, TABLE=0, BIAS=False, BIAS_MASK=False, REL_K=False, REL_V=False, REL_U=False,
            REL_W=False, UPCAST=False)
ENCODINGS = {
    "plain": {},
    "causal+rope+alibi+table+bias": dict(CAUSAL=True, ROPE=True, ROT_DIM=-1, ALIBI=True, TABLE=1, BIAS=True),
    "window+pos+ropei+grid+mask": dict(HAS_WL=True, HAS_WR=True, HAS_POS=True, ROPE=True, ROT_DIM=32,
                                       INTERLEAVED=True, TABLE=2, BIAS=True, BIAS_MASK=True),
    "causal+shaw+xl": dict(CAUSAL=True, REL_K=True, REL_V=True, REL_U=True, REL_W=True),
}
GRADS = dict(D_SLOPE=True, D_TABLE=True, D_U=True, D_W=True, D_AK=True, D_AV=True, BLOCK_T=256)


def cases(quick, only=None):
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    dims = [64, 128] if quick else [64, 80, 128, 256]
    for enc in ENCODINGS:
        for dt in dtypes:
            for D in dims:
                if only is None or only(enc, dt, D):
                    yield enc, dt, D


def compile_case(args):
    enc, dt, D, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from posattn import _triton as T
    from posattn.kernels import attention as A

    flags = dict(NONE, **ENCODINGS[enc])
    if flags["ROT_DIM"] == -1:
        flags["ROT_DIM"] = D
    rel = flags["REL_K"] or flags["REL_V"]
    out = []
    for backward, kernels in ((False, ["_attn_fwd"]),
                              (True, ["_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_dq_delta",
                                      "_attn_bwd_dbias"] + (["_attn_bwd_rel"] if rel else []))):
        bm, bn, bd, warps, stages = T._config(D, backward, rel, gpu=True, fp32=dt == "fp32")
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_R=T._next_pow2(bm + bn - 1))
        for name in kernels:
            fn = getattr(A, name.replace("_dq_delta", "_dq"))
            cx = dict(flags, **blocks, **GRADS, DELTA_PASS=name.endswith("_delta") and name != "_attn_bwd_delta",
                      HAS_DLSE=True, HEAD_BCAST=True, ROW_BCAST=False, COL_BCAST=True)
            if name == "_attn_bwd_delta":
                cx["BLOCK_M"] = 64
            params = inspect.signature(fn.fn).parameters
            cx = {k: v for k, v in cx.items() if k in params}
            sig = {}
            for p, prm in params.items():
                if "constexpr" in str(prm.annotation):
                    sig[p] = "constexpr"
                elif p in POINTERS:
                    sig[p] = "*fp32" if p in FLOAT_POINTERS else ("*i64" if p.endswith("Pos") else "*" + dt)
                else:
                    sig[p] = "fp32" if p in FLOATS else "i32"
            if "Bias" in sig and flags["BIAS"]:
                sig["Bias"] = "*i1" if flags["BIAS_MASK"] else "*" + dt
            t = time.time()
            try:
                k = triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", arch, 32),
                                   options=dict(num_warps=warps if name != "_attn_bwd_delta" else 4,
                                                num_stages=stages))
                shared = k.metadata.shared
                ok = shared <= SHARED_LIMIT[arch]
                out.append((name, enc, dt, D, arch, ok, f"shared {shared} B, {time.time() - t:.1f}s"))
            except Exception as e:  # report every failure, not only the first
                msg = str(e).strip().splitlines()
                out.append((name, enc, dt, D, arch, False, f"{type(e).__name__}: {msg[-1] if msg else ''}"))
    return out


def main(quick=False, workers=2, only=None, archs=(80, 90)):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")
    jobs = [(enc, dt, D, arch) for enc, dt, D in cases(quick, only) for arch in archs]
    failures = 0
    with ProcessPoolExecutor(workers) as pool:
        for rows in pool.map(compile_case, jobs):
            for name, enc, dt, D, arch, ok, info in rows:
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {dt} D={D:<3} {enc:<30} {name:<18} {info}", flush=True)
    print(f"{failures} failed")
    return failures


if __name__ == "__main__":
    sel = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")]
    only = (lambda enc, dt, D: any(f"{enc}/{dt}/{D}".find(x) >= 0 for x in sel)) if sel else None
    sys.exit(1 if main(quick="--quick" in sys.argv, only=only) else 0)
