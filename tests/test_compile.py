"""torch.compile: the Triton path as torch.library operators (posattn/_op.py).

- torch.library.opcheck of posattn::attn_fwd (schema, fake kernel, autograd
  registration, AOT dispatch with dynamic shapes) and of posattn::attn_bwd;
- torch.compile(fullgraph=True) of a function calling posattn.attention,
  forward and backward, against eager: no graph break, the graph holds the
  operator, same values and gradients;
- the reference path compiles too (CPU without the interpreter);
- on a GPU, Inductor's compiled forward and backward against eager.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (the `device` fixture
skips without it or a GPU). No CUDA query happens at import or collection.
"""
import os
import shutil

import pytest
import torch

import posattn
from posattn import interface

B, HQ, HKV, NQ, NK, D = 1, 2, 1, 12, 16, 16
CASES = ["plain", "causal+rope", "alibi", "distance-bias", "dense-bias", "grid-bias", "shaw+xl", "mask+positions",
         "kerple"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def op():
    if interface._op is None:
        pytest.skip(f"posattn's custom operators are unavailable: {interface._OP_ERROR!r}")
    return interface._op


def _params(case, device, dtype=torch.float32, nq=NQ, nk=NK):
    """The differentiable inputs of a case: q, k, v and the encoding's parameters."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device=device, dtype=dtype).requires_grad_()

    p = dict(q=randn(B, HQ, nq, D), k=randn(B, HKV, nk, D), v=randn(B, HKV, nk, D))
    if case == "alibi":
        p["slopes"] = posattn.alibi_slopes(HQ, device=device).requires_grad_()
    elif case == "distance-bias":
        p["table"] = randn(HQ, 4 + 3 + 1)
    elif case == "dense-bias":
        p["bias"] = randn(1, HQ, nq, nk)
    elif case == "grid-bias":
        p["grid"] = randn(7 * 7, HQ)                 # window (4, 4): Nk = 16 tokens
    elif case == "shaw+xl":
        p.update(aK=randn(HQ, 2 * 3 + 1, D, scale=0.3), aV=randn(HQ, 2 * 3 + 1, D, scale=0.3),
                 u=randn(HQ, D, scale=0.3), w=randn(HQ, D, scale=0.3))
    elif case == "kerple":
        p.update(r1=(0.5 + torch.rand(HQ)).to(device).requires_grad_(),
                 r2=(0.1 + torch.rand(HQ)).to(device).requires_grad_())
    return p


def _kwargs(case, p):
    """posattn.attention's keyword arguments, built from the parameters (inside the
    compiled function, as a model builds its encodings in forward)."""
    q = p["q"]
    nq, nk = q.shape[2], p["k"].shape[2]
    if case == "plain":
        return {}
    if case == "causal+rope":
        return dict(causal=True, rope=posattn.RoPE(base=500.0, dim=D // 2))
    if case == "alibi":
        return dict(causal=True, alibi_slopes=p["slopes"])
    if case == "distance-bias":
        return dict(rel_bias=posattn.DistanceBias(p["table"], left=4, right=3))
    if case == "dense-bias":
        return dict(bias=p["bias"], window=(5, None))
    if case == "grid-bias":
        return dict(rel_bias=posattn.GridBias(p["grid"], window=(4, 4)))
    if case == "shaw+xl":
        return dict(causal=True, rel_emb=posattn.RelativeEmbeddings(key=p["aK"], value=p["aV"], clip=3,
                                                                    content_bias=p["u"], position_bias=p["w"]))
    if case == "kerple":
        return dict(causal=True, kerple=posattn.KERPLE(p["r1"], p["r2"]))
    if case == "mask+positions":
        dev = q.device
        keep = torch.arange(nk, device=dev) % 5 != 2
        q_pos, k_pos = torch.arange(nq, device=dev) + 5, torch.arange(nk, device=dev) * 2
        # multi-axis RoPE: the operators carry its sections and positions per axis
        return dict(bias=keep[None, None, None, :], q_pos=q_pos, k_pos=k_pos, window=(6, 2),
                    rope=posattn.RoPE(interleaved=True, sections=(3, 5)),
                    rope_pos=(torch.stack((q_pos, q_pos // 3)), torch.stack((k_pos, k_pos // 3))))
    raise AssertionError(case)


def _loss(case, p, weight):
    out, lse = posattn.attention(p["q"], p["k"], p["v"], return_lse=True, **_kwargs(case, p))
    return (out.float() * weight).sum() + 0.5 * lse.sum()


def _weight(device, nq=NQ):
    return torch.randn(B, HQ, nq, D).to(device)


def _run(fn, case, p, weight):
    names = list(p)
    loss = fn(case, p, weight)
    grads = torch.autograd.grad(loss, [p[n] for n in names])
    return loss.detach(), dict(zip(names, grads))


def _recording(backend):
    """A torch.compile backend that keeps the Dynamo graphs and hands them on."""
    graphs = []

    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compile_fn, graphs


def _op_calls(graphs):
    return [n for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and "posattn.attn_fwd" in str(n.target)]


def _assert_matches(eager, compiled, rtol=1e-5, atol=1e-5):
    (l1, g1), (l2, g2) = eager, compiled
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=atol)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------- the operators

def test_operators_registered(op):
    fwd = torch.ops.posattn.attn_fwd.default._schema
    bwd = torch.ops.posattn.attn_bwd.default._schema
    assert [a.name for a in fwd.arguments[:3]] == ["q", "k", "v"] and len(fwd.returns) == 3
    assert len(bwd.returns) == 3 + len(posattn._triton._PARAMS)
    assert op.NUM_TENSORS == 8 + sum(len(c.tensors) for c in op.CODECS)  # q, k, v, q_pos, k_pos, dropout_rng, cu_seqlens_q, cu_seqlens_k


@pytest.mark.parametrize("case", CASES)
def test_opcheck_forward(case, device, op):
    p = _params(case, device)
    prob = posattn._validate.check(p["q"], p["k"], p["v"], **_kwargs(case, p))
    torch.library.opcheck(torch.ops.posattn.attn_fwd.default, op.op_args(prob))


@pytest.mark.parametrize("case", ["plain", "alibi", "distance-bias", "dense-bias", "shaw+xl", "kerple"])
def test_opcheck_backward(case, device, op):
    p = _params(case, device)
    prob = posattn._validate.check(p["q"], p["k"], p["v"], **_kwargs(case, p))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in op.op_args(prob))
    out, lse, lse2 = torch.ops.posattn.attn_fwd(*args)
    tensors, scalars = args[:op.NUM_TENSORS], args[op.NUM_TENSORS:]
    need = tuple(tensors[i] is not None and tensors[i].is_floating_point() for i in op._PARAM_SLOTS)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (*tensors[:3], out, lse2, dout, dlse, *tensors[3:], *scalars, *need)
    torch.library.opcheck(torch.ops.posattn.attn_bwd.default, bwd_args)
    grads = torch.ops.posattn.attn_bwd(*bwd_args)
    for i, want, g in zip(op._PARAM_SLOTS, need, grads[3:]):
        assert g.shape == (tensors[i].shape if want else (0,))


def test_eager_and_compiled_share_one_autograd_path(device, op, monkeypatch):
    """Eager calls run the operator's forward with its registered setup_context and
    backward (through _Attention, a Function because torch.func refuses a custom
    operator's autograd): posattn::attn_bwd computes the eager gradients too."""
    assert op._Attention.setup_context is op._setup_context and op._Attention.backward is op._backward
    calls = []
    real = op.bwd
    monkeypatch.setattr(op, "bwd", lambda *a: calls.append(1) or real(*a))
    p = _params("alibi", device)
    _run(_loss, "alibi", p, _weight(device))
    assert calls == [1]


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("case", CASES)
def test_compiled_matches_eager(case, device, op):
    """fullgraph=True: no graph break; the graph calls posattn::attn_fwd; forward and
    every gradient as in eager (same kernels: AOT autograd with the registered
    backward, run eagerly by the aot_eager backend)."""
    if posattn.select_backend(*(torch.empty(1, HQ, NQ, D, device=device),) * 3) != "triton":
        pytest.skip("the Triton backend is not selected here")
    p = _params(case, device)
    weight = _weight(device)
    eager = _run(_loss, case, p, weight)
    backend, graphs = _recording("aot_eager")
    compiled_loss = torch.compile(_loss, fullgraph=True, backend=backend)
    compiled = _run(compiled_loss, case, p, weight)
    assert len(_op_calls(graphs)) == 1
    _assert_matches(eager, compiled)
    again = _run(compiled_loss, case, p, weight)          # cached graph
    _assert_matches(eager, again)


def test_compiled_bfloat16_bias(device, op):
    """A bfloat16 dense bias: the launchers run on fake tensors while traced, which
    have no address (the kernels' two-keys-per-word read decides by storage offset)."""
    if posattn.select_backend(*(torch.empty(1, HQ, NQ, D, device=device),) * 3) != "triton":
        pytest.skip("the Triton backend is not selected here")
    p = _params("dense-bias", device, dtype=torch.bfloat16)
    weight = _weight(device)
    compiled_loss = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    _assert_matches(_run(_loss, "dense-bias", p, weight), _run(compiled_loss, "dense-bias", p, weight))


def test_compiled_dynamic_lengths(device, op):
    """Two sequence lengths through one dynamic-shape graph."""
    backend, graphs = _recording("aot_eager")
    compiled_loss = torch.compile(_loss, fullgraph=True, backend=backend, dynamic=True)
    for nq, nk in ((NQ, NK), (9, 13)):
        p = _params("distance-bias", device, nq=nq, nk=nk)
        weight = _weight(device, nq)
        _assert_matches(_run(_loss, "distance-bias", p, weight), _run(compiled_loss, "distance-bias", p, weight))
    assert _op_calls(graphs)


def _have_cxx():
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def test_compiled_inductor(device, op):
    """The default backend (Inductor): on CPU the operators stay opaque (interpreted
    kernels) around C++ code for the rest of the graph; on a GPU they are inlined
    as Inductor's user-defined Triton kernels."""
    if device == "cpu" and not _have_cxx():
        pytest.skip("Inductor on CPU needs a C++ compiler")
    case = "alibi"
    p = _params(case, device)
    p["table"] = torch.randn(HQ, 9, device=device).requires_grad_()

    def loss(case, p, weight):
        out, lse = posattn.attention(p["q"], p["k"], p["v"], causal=True, rope=posattn.RoPE(),
                                     alibi_slopes=p["slopes"], rel_bias=posattn.DistanceBias(p["table"], 4, 4),
                                     return_lse=True)
        return (out.float() * weight).sum() + 0.5 * lse.sum()

    weight = _weight(device)
    eager = _run(loss, case, p, weight)
    compiled = _run(torch.compile(loss, fullgraph=True), case, p, weight)
    _assert_matches(eager, compiled, rtol=1e-4, atol=1e-4)


def test_compiled_reference_path():
    """CPU tensors on the reference backend (plain PyTorch) compile with no graph
    break as well: Dynamo traces the argument checks and the dispatch."""
    case = "distance-bias"
    p = _params(case, "cpu")
    weight = _weight("cpu")

    def loss(case, p, weight):
        out, lse = posattn.attention(p["q"], p["k"], p["v"], causal=True, return_lse=True, backend="reference",
                                     rope=posattn.RoPE(), **_kwargs(case, p))
        return (out * weight).sum() + 0.5 * lse.sum()

    backend, graphs = _recording("aot_eager")
    _assert_matches(_run(loss, case, p, weight), _run(torch.compile(loss, fullgraph=True, backend=backend),
                                                      case, p, weight))
    assert not _op_calls(graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cuda(dtype, op):
    """On a GPU: Inductor (the kernels inlined in its generated code) against eager,
    for every case."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if interface._triton.interpreting():
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for case in CASES:
        torch._dynamo.reset()
        p = _params(case, "cuda", dtype)
        weight = _weight("cuda")
        eager = _run(_loss, case, p, weight)
        compiled = _run(torch.compile(_loss, fullgraph=True), case, p, weight)
        _assert_matches(eager, compiled, **tol)


_TRACE_SCRIPT = r'''
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget

class _Target:  # Triton's code generator asks the active driver for the target only
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(_Target())

import posattn
from posattn import _op, _validate
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition

assert not _op.INTERPRETED
B, HQ, HKV, N, D = 1, 2, 1, 16, 16
leaves = [torch.randn(B, HQ, N, D), torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D),
          posattn.alibi_slopes(HQ), torch.randn(HQ, 9), torch.randn(1, HQ, N, N)]
for t in leaves:
    t.requires_grad_()

def loss(q, k, v, slopes, table, bias):
    p = _validate.check(q, k, v, causal=True, rope=posattn.RoPE(), alibi_slopes=slopes,
                        rel_bias=posattn.DistanceBias(table, 4, 4), bias=bias, return_lse=True)
    out, lse = _op.attention(p)
    return (out * out).sum() + lse.sum()

joint = []
class Stop(Exception):
    pass

def partition(gm, inputs, **kw):
    joint.append(gm)
    raise Stop

try:
    torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=lambda g, _: g, partition_fn=partition))(*leaves)
except Exception as e:
    if not joint:
        raise
for n in joint[0].graph.nodes:
    if "triton_kernel_wrapper" in str(n.target):
        print(n.kwargs["kernel_idx"] >= 0, ",".join(sorted(n.kwargs["tensors_to_clone"])))
'''


def test_gpu_graph_traced_without_gpu(op):
    """The GPU path under torch.compile, traced on CPU with a Triton target but no GPU
    (fake tensors only, nothing runs): the operators decompose into the kernels, and
    Triton's analysis of each kernel's stores marks only its outputs as written (so
    functionalization copies nothing else). Needs JIT (not interpreted) kernels: a
    subprocess without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and ("set_active" in r.stderr or "GPUTarget" in r.stderr):
        pytest.skip(f"this Triton has no way to set a target without a GPU: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    written = [line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("True ")]
    assert written == ["Out", "Out",           # forward: q and k rotated by RoPE
                       "Lse,Lse2,Out",         # the attention
                       "Out", "Out",           # backward: q and k rotated again
                       "Stats",                # the exact-delta pass (delta, renormalised lse copy)
                       "DParams,DQ",            # dQ and the slope / table gradients' partial sums
                       "DBias,DK,DV"], r.stdout  # dK, dV and the [B, H, N, N] bias's dS from the same tiles
