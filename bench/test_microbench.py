"""pytest-benchmark microbenchmarks of posattn's Triton kernels.

    pytest bench/ --benchmark-only              # on a CUDA GPU: B=4, H=16, N=2048, D=128, bf16
    TRITON_INTERPRET=1 pytest bench/ --benchmark-only   # CPU: tiny shapes, the interpreter (timings meaningless)

Without a CUDA GPU and without TRITON_INTERPRET=1 every benchmark here skips.
Each timed call ends with torch.cuda.synchronize() on CUDA, so a round measures
the kernels, not their launch. The first call (Triton compilation) is made before
timing. extra_info holds the FLOP count and, when timed, TFLOP/s (median).
SDPA (default dispatch) is benchmarked beside posattn as a baseline.
The full comparison against the peers is bench/run.py.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import posattn

ENCODINGS = ("none", "causal", "rope", "alibi", "distance", "rope+distance")
MODES = ("fwd", "fwd+bwd")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="module")
def cfg():
    """Shapes and rounds for the device the kernels can run on, or skip."""
    if torch.cuda.is_available():
        return dict(device="cuda", dtype=torch.bfloat16, B=4, H=16, N=2048, D=128, L=128, R=128,
                    rounds=20, warmup_rounds=3, interpreted=False)
    if _interpreting():
        return dict(device="cpu", dtype=torch.float32, B=1, H=2, N=64, D=32, L=16, R=16,
                    rounds=2, warmup_rounds=0, interpreted=True)
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set: posattn's Triton kernels cannot run here")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _flops(c, causal, mode):
    f = 4.0 * c["B"] * c["H"] * c["N"] * c["N"] * c["D"] / (2 if causal else 1)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _inputs(c, mode, with_table):
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    shape = (c["B"], c["H"], c["N"], c["D"])
    q, k, v, dout = (torch.randn(*shape, generator=g).to(c["device"], c["dtype"]) for _ in range(4))
    leaves = [q, k, v]
    table = None
    if with_table:
        table = (0.5 * torch.randn(c["H"], c["L"] + c["R"] + 1, generator=g)).to(c["device"])
        leaves.append(table)
    for t in leaves:
        t.requires_grad_(grad)
    return q, k, v, dout, table, leaves


def _kwargs(c, enc, table):
    kw = {"causal": enc == "causal"}
    if "rope" in enc:
        kw["rope"] = posattn.RoPE()
    if enc == "alibi":
        kw["alibi_slopes"] = posattn.alibi_slopes(c["H"]).to(c["device"])
    if "distance" in enc:
        kw["rel_bias"] = posattn.DistanceBias(table, left=c["L"], right=c["R"])
    return kw


def _run_benchmark(benchmark, c, call, leaves, mode, flops, group):
    def step():
        if mode == "fwd+bwd":
            call()
        else:
            with torch.no_grad():
                call()
        _sync(c["device"])

    def reset():
        for t in leaves:
            t.grad = None

    reset()
    step()                       # compile (excluded from timing)
    benchmark.group = group
    benchmark.extra_info.update(flops=flops, device=c["device"], dtype=str(c["dtype"]),
                                shape=f"B={c['B']} H={c['H']} N={c['N']} D={c['D']}",
                                interpreter=c["interpreted"])
    benchmark.pedantic(step, setup=reset, rounds=c["rounds"], warmup_rounds=c["warmup_rounds"], iterations=1)
    try:
        med = benchmark.stats.stats.median
    except AttributeError:       # --benchmark-disable: no stats
        med = None
    if med:
        benchmark.extra_info["tflops"] = flops / med / 1e12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("enc", ENCODINGS)
def test_posattn(benchmark, cfg, enc, mode):
    q, k, v, dout, table, leaves = _inputs(cfg, mode, with_table="distance" in enc)

    def call():
        out = posattn.attention(q, k, v, backend="triton", **_kwargs(cfg, enc, table))
        if mode == "fwd+bwd":
            out.backward(dout)
        return out

    _run_benchmark(benchmark, cfg, call, leaves, mode, _flops(cfg, enc == "causal", mode), f"{mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", (False, True), ids=("none", "causal"))
def test_sdpa_baseline(benchmark, cfg, causal, mode):
    q, k, v, dout, _, leaves = _inputs(cfg, mode, with_table=False)

    def call():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if mode == "fwd+bwd":
            out.backward(dout)
        return out

    _run_benchmark(benchmark, cfg, call, leaves, mode, _flops(cfg, causal, mode), f"{mode}")
