"""Time the launch configurations of posattn's Triton kernels on this GPU and keep the
fastest per kind: the autotune list, run offline.

Why offline: the backward kernels write in place (the corrected delta and lse, the
table pass adding into its slots), so a launch cannot be repeated to time it inside a
training step the way triton.autotune does; and a fixed configuration keeps results
bitwise reproducible run to run. So this script times whole posattn calls (forward,
forward + backward) over `_triton.candidates(...)` for each kind of launch, checks
each candidate's output and gradients against the default's, and prints (or, with
--write, stores in posattn/_tuned.py) the winners for this GPU's architecture;
`_triton._config` then uses them on that architecture.

    python bench/tune.py [--write] [--quick] [--n N]

Kinds: forward and backward at tile widths 64, 128 and 256 (head dims 64, 128 and
256 in bfloat16), and with Shaw / Transformer-XL relative embeddings at 64 and 128
("-rel": their launches have their own configurations); --quick times only the
default and four other candidates per kind.
Without a CUDA GPU it exits with a message (nothing to measure).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import posattn  # noqa: E402
from posattn import _triton  # noqa: E402

TUNED_FILE = ROOT / "posattn" / "_tuned.py"


def kinds():
    """(kind, D, backward, rel): the launches tuned, by _config's key."""
    for rel, dims in ((False, (64, 128, 256)), (True, (64, 128))):
        for D in dims:
            for backward in (False, True):
                yield f"{'bwd' if backward else 'fwd'}{'-rel' if rel else ''}/w{D}", D, backward, rel


def _problem(D, n, device, rel=False):
    """q, k, v, dout and the attention keywords: causal, plus Shaw's key and value tables
    and Transformer-XL's u, w (clip 64) for the relative kinds."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H = max(1, 16384 // n), 2048 // D

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, torch.bfloat16).requires_grad_()
    q, k, v = rnd(B, H, n, D), rnd(B, H, n, D), rnd(B, H, n, D)
    kw = dict(causal=True)
    if rel:
        kw["rel_emb"] = posattn.RelativeEmbeddings(rnd(H, 129, D, scale=0.3), rnd(H, 129, D, scale=0.3), 64,
                                                   rnd(H, D, scale=0.3), rnd(H, D, scale=0.3))
    return q, k, v, rnd(B, H, n, D).detach(), kw


def _run(q, k, v, dout, backward, kw):
    out = posattn.attention(q, k, v, backend="triton", **kw)
    if not backward:
        return (out,)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _forced(kind, config):
    """Context: _config returns `config` for `kind` on this architecture."""
    arch = f"sm_{'%d%d' % torch.cuda.get_device_capability()}"

    class Force:
        def __enter__(self):
            self.saved = {a: dict(t) for a, t in _triton._tuned.TUNED.items()}
            _triton._tuned.TUNED.setdefault(arch, {})[kind] = config

        def __exit__(self, *exc):
            _triton._tuned.TUNED.clear()
            _triton._tuned.TUNED.update(self.saved)
    return Force()


def tune(n, quick):
    from triton.testing import do_bench
    device = torch.device("cuda")
    winners = {}
    for kind, D, backward, rel in kinds():
        q, k, v, dout, kw = _problem(D, n, device, rel)
        want = _run(q, k, v, dout, backward, kw)
        rows = []
        cands = _triton.candidates(D, backward, rel)
        for config in (cands[:5] if quick else cands):
            with _forced(kind, config):
                try:
                    got = _run(q, k, v, dout, backward, kw)
                    err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want))
                    if not err < 2e-2:
                        rows.append((config, None, f"wrong (relative error {err:.2e})"))
                        continue
                    ms = do_bench(lambda: _run(q, k, v, dout, backward, kw), warmup=10, rep=50, return_mode="median")
                    rows.append((config, ms, ""))
                except Exception as e:  # out of resources, compile errors: not a candidate here
                    rows.append((config, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        timed = [r for r in rows if r[1] is not None]
        for config, ms, why in rows:
            print(f"{kind:10} {str(config):22} " + (f"{ms:8.3f} ms" if ms is not None else why), flush=True)
        if timed:
            best = min(timed, key=lambda r: r[1])
            default = timed[0] if timed[0][0] == cands[0] else None
            gain = f" ({default[1] / best[1]:.2f}x the default)" if default else ""
            print(f"-> {kind}: {best[0]}{gain}\n", flush=True)
            winners[kind] = best[0]
    return winners


def write(arch, winners, path=TUNED_FILE):
    """Store the winners for `arch` in posattn/_tuned.py (other architectures kept)."""
    src = Path(path).read_text()
    head, _, rest = src.partition("TUNED: dict = ")
    tuned = ast.literal_eval(rest.strip())
    tuned[arch] = {k: tuple(v) for k, v in sorted(winners.items())}
    Path(path).write_text(head + "TUNED: dict = " + repr(tuned) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="store the winners in posattn/_tuned.py")
    ap.add_argument("--quick", action="store_true", help="the default and four other candidates per kind")
    ap.add_argument("--n", type=int, default=4096, help="sequence length (B = 16k / n, H = 2048 / D)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available():
        print("bench/tune.py: no CUDA GPU (or TRITON_INTERPRET is set): nothing to tune")
        return 0
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} ({arch}), torch {torch.__version__}, n={args.n}\n")
    winners = tune(args.n, args.quick)
    print(f"{arch}: {winners}")
    if args.write and winners:
        write(arch, winners)
        print(f"written to {TUNED_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
