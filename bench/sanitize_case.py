"""One tiny forward + backward per backend with every encoding it supports turned on,
for compute-sanitizer (memcheck, racecheck): bench/gpu_check.py runs

    compute-sanitizer --tool memcheck --leak-check no python3 bench/sanitize_case.py triton
    compute-sanitizer --tool racecheck python3 bench/sanitize_case.py cuda

with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (PyTorch's caching allocator would hide
out-of-bounds accesses inside its blocks) and without TRITON_INTERPRET.

Shapes: B=1, Hq=2, Hkv=1 (GQA), N=70, D=40 (no multiple of a tile, D padded).
Call 1 (both backends): causal, window (33, 7), RoPE, ALiBi slopes, a DistanceBias
table and a dense float bias, the last three requiring grad, return_lse.
Call 2: triton: RelativeEmbeddings(key, value, clip, content_bias, position_bias),
all requiring grad, with interleaved partial RoPE and a bool mask; cuda (which has
no rel_emb): GridBias requiring grad, a bool mask, explicit shuffled positions and
interleaved partial RoPE. Then backward through out and lse. The output is
compared loosely with the float64 reference (a sanity check; tests/ holds the
precision checks).

Prints "SANITIZE-CASE: ok ..." and exits 0; "SANITIZE-CASE: skip: <why>" and exits 0
when the backend refuses to run here (no GPU, extension not built); exits 1 on a
wrong result.
"""
from __future__ import annotations

import argparse
import sys

import torch


def _leaf(x):
    return x.detach().requires_grad_()


def _calls(backend, dev, dt):
    import posattn
    B, Hq, Hkv, N, D = 1, 2, 1, 70, 40
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=dt, scale=1.0):
        return _leaf((scale * torch.randn(*shape, generator=g)).to(device=dev, dtype=dtype))

    q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, D)
    first = dict(causal=True, window=(33, 7), rope=posattn.RoPE(),
                 alibi_slopes=_leaf(posattn.alibi_slopes(Hq, device=dev)),
                 rel_bias=posattn.DistanceBias(rnd(Hq, 9 + 4 + 1, dtype=torch.float32), 9, 4),
                 bias=rnd(B, Hq, N, N, scale=0.5), return_lse=True)
    mask = (torch.rand(1, 1, N, N, generator=g) < 0.8).to(dev)
    mask[..., 0] = True                                   # no empty row
    rope2 = posattn.RoPE(dim=16, interleaved=True, base=500.0)
    if backend == "triton":
        K = 5
        rel = posattn.RelativeEmbeddings(rnd(Hq, 2 * K + 1, D, dtype=torch.float32, scale=0.3),
                                         rnd(Hq, 2 * K + 1, D, dtype=torch.float32, scale=0.3), K,
                                         rnd(Hq, D, dtype=torch.float32, scale=0.3),
                                         rnd(Hq, D, dtype=torch.float32, scale=0.3))
        second = dict(rel_emb=rel, rope=rope2, bias=mask, return_lse=True)
    else:
        wh, ww = 7, 10                                    # Wh * Ww = N tokens
        pos = torch.randperm(N, generator=g).to(dev)
        second = dict(rel_bias=posattn.GridBias(rnd((2 * wh - 1) * (2 * ww - 1), Hq, dtype=torch.float32),
                                                (wh, ww)),
                      bias=mask, q_pos=pos, k_pos=pos, rope=rope2, return_lse=True)
    return (q, k, v), [first, second]


def _params(kw):
    out = [kw.get("alibi_slopes"), kw.get("bias")]
    if kw.get("rel_bias") is not None:
        out.append(kw["rel_bias"].table)
    re = kw.get("rel_emb")
    if re is not None:
        out += [re.key, re.value, re.content_bias, re.position_bias]
    return [t for t in out if t is not None and t.requires_grad]


def run(backend: str, dtype: str = "bfloat16") -> int:
    import posattn
    from posattn import _validate
    if not torch.cuda.is_available():
        print("SANITIZE-CASE: skip: no CUDA GPU")
        return 0
    dev, dt = "cuda", getattr(torch, dtype)
    (q, k, v), calls = _calls(backend, dev, dt)
    if backend == "cuda":
        from posattn import _cuda
        for kw in calls:
            why = _cuda.refusal(_validate.check(q, k, v, **kw))
            if why is not None:
                print(f"SANITIZE-CASE: skip: backend 'cuda' refused: {why}")
                return 0
    print(f"SANITIZE-CASE: start {backend} {dtype}", flush=True)
    worst = 0.0
    for i, kw in enumerate(calls):
        params = _params(kw)
        out, lse = posattn.attention(q, k, v, backend=backend, **kw)
        w = torch.randn(out.shape, device=dev, dtype=torch.float32)
        loss = (out.float() * w).sum() + lse[torch.isfinite(lse)].sum()
        grads = torch.autograd.grad(loss, [q, k, v, *params])
        torch.cuda.synchronize()
        if not all(torch.isfinite(x).all() for x in (out, *grads)):
            print(f"SANITIZE-CASE: FAIL: call {i + 1}: non-finite output or gradient")
            return 1
        ref = posattn.reference.attention(*(x.detach().double() for x in (q, k, v)),
                                          **{n: (x.detach().double() if isinstance(x, torch.Tensor)
                                                 and x.is_floating_point() else x) for n, x in kw.items()
                                             if n not in ("return_lse",)})
        err = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        if not err < 0.05:
            print(f"SANITIZE-CASE: FAIL: call {i + 1}: output relative error {err:.3g} vs the float64 reference")
            return 1
    print(f"SANITIZE-CASE: ok {backend} {dtype}: {len(calls)} calls, forward + backward, "
          f"max output error {worst:.2g}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backend", choices=("triton", "cuda"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = ap.parse_args(argv)
    return run(args.backend, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
