"""Swin window attention, timed: posattn (GridBias and the shifted-window mask in the
kernels) against Swin's own route (the table gathered into a dense [H, N, N] bias,
the mask added, then SDPA with that bias), forward and forward + backward with the
table's gradient.

    python bench/swin.py                      # Swin-T's four stages at 224 px, batch 32
    python bench/swin.py --stage 2048,3,32    # windows, heads, head dim (repeatable)
    TRITON_INTERPRET=1 python bench/swin.py --smoke   # CPU: tiny shapes, numbers meaningless

On a GPU the times are triton.testing.do_bench medians (ms), bf16. Every call is also
checked against the dense route (largest relative error of the output and of the
table's gradient), so a wrong answer shows next to its time.
"""
import argparse
import time

import torch

import posattn

# Swin-T at 224 px, batch 32: (windows, heads, head dim) per stage, 7 x 7 windows,
# 64 / 16 / 4 / 1 windows per image (shifted blocks mask all but the last stage's)
SWIN_T = ((2048, 3, 32), (512, 6, 32), (128, 12, 32), (32, 24, 32))
IMAGES = 32


def shifted_mask(per_image, n, device, dtype, gen):
    """A [nW, 1, N, N] additive mask of 0 / -100 (Swin's value), one per window of an image."""
    keep = torch.rand(per_image, 1, n, n, generator=gen) < 0.7
    keep |= torch.eye(n, dtype=torch.bool)   # every row keeps itself
    return torch.where(keep, 0.0, -100.0).to(device=device, dtype=dtype)


def problem(windows, heads, dim, window, per_image, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = window[0] * window[1]

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()
    q, k, v = (rnd(windows, heads, n, dim) for _ in range(3))
    table = (0.02 * torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, generator=g)).to(device)
    table.requires_grad_()
    mask = shifted_mask(per_image, n, device, dtype, g) if per_image else None
    return q, k, v, table, mask


def fused(q, k, v, table, mask, window, backend=None):
    return posattn.attention(q, k, v, rel_bias=posattn.GridBias(table, window), bias=mask, backend=backend)


def dense(q, k, v, table, mask, window, index):
    """Swin's route: the table gathered into [H, N, N], the mask added per window of an
    image (batch b is window b % nW), SDPA with the dense bias."""
    n = q.shape[2]
    bias = table[index.flatten()].view(n, n, -1).permute(2, 0, 1).to(q.dtype)   # [H, N, N]
    if mask is None:
        full = bias[None].expand(q.shape[0], -1, -1, -1)
    else:
        per = mask.shape[0]
        full = (bias[None, None] + mask[None]).expand(q.shape[0] // per, -1, -1, -1, -1).reshape(
            q.shape[0], q.shape[1], n, n)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full)


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def timed(fn, gpu, reps=2):
    if gpu:
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run_stage(windows, heads, dim, window, per_image, device, dtype, backend=None):
    q, k, v, table, mask = problem(windows, heads, dim, window, per_image, device, dtype)
    pos = torch.arange(window[0] * window[1], device=device)
    index = posattn.GridBias(table, window).index(pos, pos)   # Swin's relative_position_index
    do = torch.randn_like(q)
    routes = {"posattn": lambda: fused(q, k, v, table, mask, window, backend),
              "gather+sdpa": lambda: dense(q, k, v, table, mask, window, index)}
    outs, grads, rows = {}, {}, []
    for name, f in routes.items():
        out = f()
        outs[name] = out.detach()
        grads[name] = torch.autograd.grad(out, (q, k, v, table), do)
    err = max(rel_err(outs["posattn"], outs["gather+sdpa"]),
              *(rel_err(a, b) for a, b in zip(grads["posattn"], grads["gather+sdpa"])))
    gpu = device == "cuda"
    for name, f in routes.items():
        fwd = timed(lambda: f(), gpu)
        both = timed(lambda: torch.autograd.grad(f(), (q, k, v, table), do), gpu)
        rows.append((name, fwd, both))
    return rows, err


def _interpreting():
    from posattn import _triton
    return _triton.interpreting()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", action="append", default=None,
                    help="windows,heads,head_dim (default: Swin-T's four stages at batch 32)")
    ap.add_argument("--window", type=int, default=7)
    ap.add_argument("--unshifted", action="store_true", help="no shifted-window mask")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, the interpreter)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    if args.smoke:
        stages, window = [(4, 2, 16)], (3, 4)
    else:
        stages = [tuple(int(x) for x in s.split(",")) for s in args.stage] if args.stage else list(SWIN_T)
        window = (args.window, args.window)
    n = window[0] * window[1]
    print(f"Swin window attention: {window[0]} x {window[1]} windows (N = {n}), {dtype}, {device}"
          f"{'' if gpu else ' (no GPU: numbers meaningless)'}; ms, median")
    print(f"{'windows':>8} {'heads':>5} {'D':>4} {'route':>12} {'fwd':>9} {'fwd+bwd':>9}  max rel err vs dense")
    worst = 0.0
    for windows, heads, dim in stages:
        per_image = 0 if args.unshifted else max(1, min(windows // IMAGES, windows)) if not args.smoke else 2
        rows, err = run_stage(windows, heads, dim, window, per_image, device, dtype,
                              "triton" if args.smoke and _interpreting() else None)
        worst = max(worst, err)
        for name, fwd, both in rows:
            print(f"{windows:>8} {heads:>5} {dim:>4} {name:>12} {fwd:9.3f} {both:9.3f}  {err:.2e}")
    return worst


if __name__ == "__main__":
    main()
