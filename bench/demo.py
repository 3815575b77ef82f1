"""Run each positional encoding through posattn.attention against the reference.

For every encoding config this makes random q/k/v (GQA: Hq=4, Hkv=2), runs
``posattn.attention`` (automatic backend unless --backend or POSATTN_BACKEND
says otherwise) forward and backward, runs ``posattn.reference.attention(...,
upcast=True)`` (float64) on the same inputs, and prints a table of relative
errors ``||a - b|| / ||b||`` of out, dq, dk, dv (and of the encoding's own
parameter gradient where it has one) with forward and forward+backward times.

Device: cuda if available (N=2048, bfloat16), else cpu (N=200, float32).
On cpu, ``TRITON_INTERPRET=1`` (``make demo`` sets it when there is no NVIDIA
GPU) lets the triton backend run its real kernels in Triton's interpreter.

    python bench/demo.py [--backend triton|reference] [--n N] [--reps R]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

import posattn
import posattn.reference

B, HQ, HKV, D = 1, 4, 2, 64

# Relative-error level above which a row is flagged (a demo, not a test).
FLAG_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------
# Encoding configs. Each returns (params, build): params are the encoding's
# trainable tensors (leaves; gradients compared), build(params) returns the
# keyword arguments of posattn.attention. Tables are built inside build() so
# that DistanceBias.t5 is rebuilt in each forward pass, as documented.
# --------------------------------------------------------------------------

def _none(n, dev, dt, g):
    return [], lambda p: {}


def _causal(n, dev, dt, g):
    return [], lambda p: {"causal": True}


def _window(n, dev, dt, g):
    return [], lambda p: {"window": (64, 0)}


def _rope_half(n, dev, dt, g):
    return [], lambda p: {"rope": posattn.RoPE()}


def _rope_interleaved_partial(n, dev, dt, g):
    return [], lambda p: {"rope": posattn.RoPE(dim=32, interleaved=True)}


def _alibi(n, dev, dt, g):
    slopes = posattn.alibi_slopes(HQ).to(dev, torch.float32)
    return [slopes], lambda p: {"alibi_slopes": p[0]}


def _t5(n, dev, dt, g):
    weight = 0.5 * torch.randn(32, HQ, generator=g).to(dev)
    return [weight], lambda p: {
        "rel_bias": posattn.DistanceBias.t5(p[0], num_buckets=32, max_distance=128, bidirectional=True)}


def _dense_bias(n, dev, dt, g):
    bias = torch.randn(1, HQ, n, n, generator=g).to(dev, dt)
    return [bias], lambda p: {"bias": p[0]}


def _bool_mask(n, dev, dt, g):
    keep = (torch.rand(B, 1, n, n, generator=g) < 0.8).to(dev)
    return [], lambda p: {"bias": keep}


def _rope_alibi(n, dev, dt, g):
    slopes = posattn.alibi_slopes(HQ).to(dev, torch.float32)
    return [slopes], lambda p: {"rope": posattn.RoPE(), "alibi_slopes": p[0]}


def _rope_distance(n, dev, dt, g):
    left = right = 64
    table = 0.5 * torch.randn(HQ, left + right + 1, generator=g).to(dev)
    return [table], lambda p: {"rope": posattn.RoPE(),
                               "rel_bias": posattn.DistanceBias(p[0], left=left, right=right)}


def _grid(n, dev, dt, g):
    wh = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)   # a Wh x Ww window of n tokens
    ww = n // wh
    table = 0.5 * torch.randn((2 * wh - 1) * (2 * ww - 1), HQ, generator=g).to(dev)
    return [table], lambda p: {"rel_bias": posattn.GridBias(p[0], (wh, ww))}


def _shaw(n, dev, dt, g):
    K = 16
    a_k = 0.5 * torch.randn(HQ, 2 * K + 1, D, generator=g).to(dev)
    a_v = 0.5 * torch.randn(HQ, 2 * K + 1, D, generator=g).to(dev)
    return [a_k, a_v], lambda p: {"rel_emb": posattn.RelativeEmbeddings(p[0], p[1], clip=K)}


def _transformer_xl(n, dev, dt, g):
    r_proj = 0.1 * torch.randn(HQ * D, 128, generator=g).to(dev)
    u = 0.3 * torch.randn(HQ, D, generator=g).to(dev)
    w = 0.3 * torch.randn(HQ, D, generator=g).to(dev)
    return [r_proj, u, w], lambda p: {
        "causal": True, "rel_emb": posattn.RelativeEmbeddings.transformer_xl(p[0], p[1], p[2], clip=n - 1)}


CONFIGS = [
    ("none", _none),
    ("causal", _causal),
    ("window(64,0)", _window),
    ("rope half-split", _rope_half),
    ("rope interleaved dim=32", _rope_interleaved_partial),
    ("alibi", _alibi),
    ("DistanceBias(t5)", _t5),
    ("dense float bias", _dense_bias),
    ("bool mask", _bool_mask),
    ("rope+alibi", _rope_alibi),
    ("rope+DistanceBias", _rope_distance),
    ("GridBias (Swin)", _grid),
    ("Shaw K=16", _shaw),
    ("Transformer-XL", _transformer_xl),
]


# --------------------------------------------------------------------------

def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rel_err(a, b):
    if a is None or b is None:
        return float("nan")
    a, b = a.detach().double(), b.detach().double()
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _forward_backward(fn, qkv, params, build, dout, **extra):
    q, k, v = _leaves(qkv)
    ps = _leaves(params)
    out = fn(q, k, v, **build(ps), **extra)
    out.backward(dout.to(out.dtype))
    return out.detach(), [q.grad, k.grad, v.grad], [p.grad for p in ps]


def _time_ms(dev, reps, step):
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    _sync(dev)
    return (time.perf_counter() - t0) * 1e3 / reps


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolved_backend(qkv, kwargs, backend):
    """Name of the backend posattn.attention runs for this problem."""
    return posattn.select_backend(*qkv, backend=backend, **kwargs)


def run_config(name, make, dev, dt, n, backend, reps, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, n, D, generator=g).to(dev, dt)
    k = torch.randn(B, HKV, n, D, generator=g).to(dev, dt)
    v = torch.randn(B, HKV, n, D, generator=g).to(dev, dt)
    dout = torch.randn(B, HQ, n, D, generator=g).to(dev, dt)
    params, build = make(n, dev, dt, g)
    qkv = (q, k, v)
    used = resolved_backend(qkv, build(params), backend)

    # Correctness run (also the warm-up: Triton compiles here).
    out, grads, pgrads = _forward_backward(posattn.attention, qkv, params, build, dout, backend=backend)
    ref_out, ref_grads, ref_pgrads = _forward_backward(
        posattn.reference.attention, qkv, params, build, dout, upcast=True)
    errs = [_rel_err(out, ref_out)] + [_rel_err(a, b) for a, b in zip(grads, ref_grads)]
    perr = max((_rel_err(a, b) for a, b in zip(pgrads, ref_pgrads)), default=None)
    if dev.type == "cuda":  # a second warm-up, for the no-grad forward
        with torch.no_grad():
            posattn.attention(q, k, v, backend=backend, **build(params))

    def fwd():
        with torch.no_grad():
            posattn.attention(q, k, v, backend=backend, **build(params))

    def fwd_bwd():
        _forward_backward(posattn.attention, qkv, params, build, dout, backend=backend)

    t_fwd = _time_ms(dev, reps, fwd)
    t_fwd_bwd = _time_ms(dev, reps, fwd_bwd)
    return used, errs, perr, t_fwd, t_fwd_bwd


def main(argv=None):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["triton", "reference"], default=None,
                    help="backend for posattn.attention (default: automatic)")
    ap.add_argument("--n", type=int, default=2048 if dev.type == "cuda" else 200,
                    help="sequence length Nq = Nk")
    ap.add_argument("--reps", type=int, default=10 if dev.type == "cuda" else 2,
                    help="timed repetitions per measurement")
    ap.add_argument("--only", default=None, help="run only configs whose name contains this text")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency
        triton_version = "not installed"
    print(f"posattn demo: B={B} Hq={HQ} Hkv={HKV} Nq=Nk={args.n} D={D} dtype={str(dt).replace('torch.', '')} "
          f"device={dev_name}")
    print(f"torch {torch.__version__}, triton {triton_version}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '<unset>')}, "
          f"POSATTN_BACKEND={os.environ.get('POSATTN_BACKEND', '<unset>')}, "
          f"--backend={args.backend or 'auto'}")
    print("rel err = ||posattn - reference(upcast=True)|| / ||reference||; d(enc) = gradient of the "
          "encoding's own parameter (slopes, table, bias)")
    print()

    cols = ["encoding", "backend", "device", "out", "dq", "dk", "dv", "d(enc)", "fwd ms", "fwd+bwd ms", ""]
    widths = [24, 9, 6, 9, 9, 9, 9, 9, 10, 11, 4]
    fmt_row = lambda cells: "  ".join(str(c).ljust(w) if i < 3 or i == len(cells) - 1 else str(c).rjust(w)
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(fmt_row(cols))
    print(fmt_row(["-" * w for w in widths[:-1]] + [""]))

    failures, flagged, backends_used = [], [], set()
    for name, make in CONFIGS:
        if args.only and args.only not in name:
            continue
        try:
            used, errs, perr, t_fwd, t_fwd_bwd = run_config(name, make, dev, dt, args.n, args.backend,
                                                      args.reps, args.seed)
        except Exception as exc:  # keep going: show every config
            failures.append(name)
            print(fmt_row([name, args.backend or "auto", dev.type]) + f"  FAILED: {type(exc).__name__}: {exc}")
            if os.environ.get("POSATTN_DEMO_TRACEBACK"):
                traceback.print_exc()
            continue
        tol = FLAG_TOL[dt]
        high = any(not (e <= tol) for e in errs) or (perr is not None and not (perr <= tol))
        if high:
            flagged.append(name)
        backends_used.add(used)
        print(fmt_row([name, used, dev.type]
                      + [f"{e:.2e}" for e in errs]
                      + ["-" if perr is None else f"{perr:.2e}"]
                      + [f"{t_fwd:.2f}", f"{t_fwd_bwd:.2f}", "HIGH" if high else ""]))
        sys.stdout.flush()

    print()
    if dev.type == "cpu" and "reference" in backends_used and not _interpreting():
        print("note: without TRITON_INTERPRET=1 the cpu runs use the reference backend; "
              "TRITON_INTERPRET=1 (as `make demo` sets with no GPU) runs the Triton kernels in the interpreter")
    if flagged:
        print(f"flagged (rel err > {FLAG_TOL[dt]:g}): {', '.join(flagged)}")
    if failures:
        print(f"failed: {', '.join(failures)} (POSATTN_DEMO_TRACEBACK=1 shows tracebacks)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
