"""CUDA C++ backend: the csrc/ extension (loader) and its autograd wrapper.

The operators ``torch.ops.posattn_cuda.fwd`` / ``bwd`` (csrc/ops.cpp) come from
either the module ``posattn._C`` built ahead of time by setup.py (``FORCE_CUDA=1``
or ``TORCH_CUDA_ARCH_LIST``), or, when that is absent, a just-in-time build of
csrc/ with ``torch.utils.cpp_extension.load`` (ninja + nvcc) at first use, cached in
a build directory (``POSATTN_CUDA_BUILD_DIR``, default
``~/.cache/posattn/cuda-<torch>-<cuda>-py<ver>``). ``POSATTN_CUDA_JIT=0`` turns the
just-in-time build off.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from . import _autograd
from ._validate import Problem
from .backends import Declaration
from .encodings import ALiBi, DenseBias, DistanceBias, GridBias, RoPE

JIT_SOURCES = ("ops.cpp", "attn_fwd.cu", "attn_bwd.cu", "attn_dbias.cu")
_INT64_MAX = 2 ** 63 - 1

_lock = threading.Lock()
_load_error: Optional[str] = None
_loaded = False


def _ops():
    """The operator namespace (tests on CPU swap in the emulated one)."""
    return torch.ops.posattn_cuda


def csrc_dir() -> Optional[Path]:
    """csrc/ of a source checkout (editable install), or the copy installed in the package."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in JIT_SOURCES):
            return cand
    return None


def build_dir() -> Path:
    env = os.environ.get("POSATTN_CUDA_BUILD_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"cuda-{torch.__version__}-{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / "posattn" / tag.replace("+", "_")


def _load_once() -> Optional[str]:
    """Load the operators; None on success, else why not."""
    try:
        importlib.import_module("posattn._C")
        return None
    except ImportError as e:
        aot = f"no prebuilt posattn._C ({e})"
    except OSError as e:  # built for another torch / CUDA
        aot = f"posattn._C failed to load ({e})"
    if os.environ.get("POSATTN_CUDA_JIT", "1") == "0":
        return f"{aot}, and POSATTN_CUDA_JIT=0 turns the just-in-time build off"
    src = csrc_dir()
    if src is None:
        return f"{aot}, and the CUDA sources (csrc/) are not installed for a just-in-time build"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return f"{aot}, and nvcc was not found for a just-in-time build (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return f"{aot}, and the just-in-time build needs ninja (pip install ninja)"
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(src / f) for f in JIT_SOURCES]
    libs = list(out.glob("posattn_cuda*.so"))
    newest_source = max(f.stat().st_mtime for f in src.iterdir() if f.is_file())
    if not libs or newest_source > max(lib.stat().st_mtime for lib in libs):
        print(f"posattn: compiling the CUDA fallback extension into {out} (first use only; "
              f"this takes a few minutes) ...", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name="posattn_cuda", sources=sources, build_directory=str(out),
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], is_python_module=False,
                           verbose=os.environ.get("POSATTN_CUDA_VERBOSE", "0") not in ("", "0"))
    except Exception as e:  # compiler errors, missing headers, ...
        msg = str(e).strip().splitlines()
        return (f"{aot}, and the just-in-time build in {out} failed ({type(e).__name__}: "
                f"{msg[-1] if msg else ''}); POSATTN_CUDA_VERBOSE=1 shows the compiler output")
    return None


def load_error() -> Optional[str]:
    """Load the extension once per process; None when its operators are available."""
    global _loaded, _load_error
    with _lock:
        if not _loaded:
            _load_error = _load_once()
            _loaded = True
        return _load_error


def _grid_limits(p: Problem) -> Optional[str]:
    if p.B > 65535 or p.Hq > 65535:
        return f"B={p.B}, Hq={p.Hq}: at most 65535 each (CUDA grid)"
    return None


def _rope_single_axis(e, p):
    if e.axis_positions is not None:
        return "multi-axis RoPE (rope_pos=) is not implemented by the cuda backend"
    return None


DECLARATION = Declaration(
    name="cuda",
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    max_head_dim=256,
    encodings={RoPE: _rope_single_axis, ALiBi: None, DistanceBias: None, GridBias: None, DenseBias: None},
    checks=(_grid_limits, lambda p: "attention dropout (dropout_p > 0) is not implemented by the cuda backend"
                                    if p.dropout_p > 0 else None,
            lambda p: "packed sequences (attention_varlen) are not implemented by the cuda backend"
            if p.varlen is not None else None),
)


def unsupported(p: Problem) -> Optional[str]:
    """Why the kernels cannot compute this problem (whatever the machine), or None:
    every reason, from the declaration (anything it does not list is refused)."""
    return DECLARATION.refusal(p)


def refusal(p: Problem) -> Optional[str]:
    """Why the CUDA backend cannot run this problem, or None when it can. Cheap checks
    first; the extension is loaded (or built) only for a problem it could run."""
    dev = p.q.device
    if dev.type != "cuda":
        return "tensors are not on a CUDA device"
    if torch.version.cuda is None:
        return "torch has no CUDA (a ROCm build?)" if torch.version.hip else "torch has no CUDA"
    why = unsupported(p)
    if why is not None:
        return why
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 (the kernels need sm_80+)"
    why = load_error()
    if why is not None:
        return f"extension not built: {why}"
    return None


def _window(w):
    return None if w is None else min(int(w), _INT64_MAX)


class _Args:
    """The operators' non-differentiable arguments, built once per call."""

    def __init__(self, p: Problem):
        dev = p.q.device
        self.q_pos = self.k_pos = None
        if p.q_pos is not None or p.k_pos is not None:  # one explicit side: materialise the other (O(N))
            self.q_pos, self.k_pos = p.default_positions(dev)
        self.inv_freq = p.rope.inv_freq_for(p.D, dev) if p.rope is not None else None
        rb = p.rel_bias
        # The kernels read a per-head table [Hq, T]: DistanceBias's layout; GridBias
        # (Swin's [T, Hq]) goes in transposed and its gradient comes back transposed.
        self.grid_table = isinstance(rb, GridBias)
        table = (0, 0, 0) if rb is None else (2, *rb.window) if self.grid_table else (1, rb.left, rb.right)
        self.scalars = (p.causal, p.scale, _window(p.window_left), _window(p.window_right), p.rotary_dim,
                        bool(p.rope is not None and p.rope.interleaved),
                        p.rope.attention_factor if p.rope is not None else 1.0, *table)


# The differentiable inputs after q, k, v, as (keyword, tensor name).
_PARAM_NAMES = (("alibi_slopes", "alibi_slopes"), ("rel_bias", "table"), ("bias", "bias"))


class _CudaAttention(torch.autograd.Function):
    """The fused forward; its backward is wrapped in :class:`posattn._autograd.FusedBackward`
    (differentiable: double backward through the reference's ops)."""

    @staticmethod
    def forward(p: Problem, args: _Args, q, k, v, alibi, table, bias):
        params_need_grad = any(x is not None and x.requires_grad for x in (alibi, table, bias))
        head_table = table.t() if table is not None and args.grid_table else table
        out, lse, out32 = _ops().fwd(q, k, v, args.q_pos, args.k_pos, args.inv_freq, alibi, head_table, bias,
                                     *args.scalars, params_need_grad)
        # With a parameter gradient wanted in fp16/bf16, the backward's delta uses the
        # unrounded output (as in the Triton backend).
        return out, lse, out32   # out32: empty unless a parameter gradient is wanted

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, args, q, k, v, alibi, table, bias = inputs
        out, lse, out32 = output
        ctx.mark_non_differentiable(out32)
        ctx.problem, ctx.args = p, args
        ctx.save_for_backward(q, k, v, out32 if out32.numel() else out, lse, alibi, table, bias)

    @staticmethod
    def backward(ctx, dout, dlse, _dout32):
        q, k, v, out, lse, alibi, table, bias = ctx.saved_tensors
        need = tuple(bool(x) for x in ctx.needs_input_grad[5:8])
        if dout is None:
            dout = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
        args = ctx.args

        def first(out, lse, q, k, v, dout, dlse, alibi, table, bias):
            return _backward(args, need, q, k, v, out, lse, dout, dlse, alibi, table, bias)
        return (None, None, *_autograd.FusedBackward.apply(ctx.problem, _PARAM_NAMES, first, out, lse,
                                                           q, k, v, dout, dlse, alibi, table, bias))

    vmap = staticmethod(_autograd.refuse_vmap("cuda"))
    jvp = staticmethod(_autograd.refuse_jvp("cuda"))


def _backward(args: _Args, need, q, k, v, out, lse, dout, dlse, alibi, table, bias):
    head_table = table.t() if table is not None and args.grid_table else table
    dq, dk, dv, g_slope, g_table, g_bias = _ops().bwd(
        q, k, v, out, lse, dout, dlse, args.q_pos, args.k_pos, args.inv_freq, alibi, head_table, bias,
        *args.scalars, *need)
    if need[0]:
        if alibi.shape[0] == 1:
            g_slope = g_slope.sum(0, keepdim=True)
        g_slope = g_slope.to(alibi.dtype)
    else:
        g_slope = None
    if need[1]:
        g_table = (g_table.t() if args.grid_table else g_table).to(table.dtype)
    else:
        g_table = None
    g_bias = g_bias.to(bias.dtype) if need[2] else None
    return dq, dk, dv, g_slope, g_table, g_bias


def attention(p: Problem):
    table = p.rel_bias.table if p.rel_bias is not None else None
    bias = p.bias
    if bias is not None and p.bias_is_mask and bias.requires_grad:
        bias = bias.detach()
    out, lse, _ = _CudaAttention.apply(p, _Args(p), p.q, p.k, p.v, p.alibi, table, bias)
    return (out, lse) if p.return_lse else out
