"""The public API: argument validation (type, message naming the argument, same error
from posattn.attention and posattn.reference.attention), backend selection, the
accepted forms of every argument, and the reference against PyTorch's SDPA.

Everything runs on CPU through the reference backend except the tests taking the
`device` fixture, which launch the Triton kernels (interpreter or CUDA)."""
import math

import pytest
import torch
import torch.nn.functional as F

import posattn
from posattn import DistanceBias, RoPE

B, HQ, HKV, NQ, NK, D = 2, 4, 2, 5, 7, 8
ENTRY_POINTS = [posattn.attention, posattn.reference.attention]
ENTRY_IDS = ["attention", "reference"]


def qkv(b=B, hq=HQ, hkv=HKV, nq=NQ, nk=NK, d=D, dtype=torch.float32, device="cpu"):
    return (torch.randn(b, hq, nq, d, dtype=dtype, device=device),
            torch.randn(b, hkv, nk, d, dtype=dtype, device=device),
            torch.randn(b, hkv, nk, d, dtype=dtype, device=device))


def with_(i, x):
    """qkv() with the i-th of (q, k, v) replaced by x."""
    t = list(qkv())
    t[i] = x
    return t


# id -> (make (args, kwargs), exception, match). Each must be raised by both entry points.
BAD = {
    # q, k, v
    "q-not-tensor": (lambda: (with_(0, [[1.0]]), {}), TypeError, r"\bq must be a torch.Tensor"),
    "k-not-tensor": (lambda: (with_(1, 1.0), {}), TypeError, r"\bk must be a torch.Tensor"),
    "v-not-tensor": (lambda: (with_(2, None), {}), TypeError, r"\bv must be a torch.Tensor"),
    "q-3d": (lambda: (with_(0, torch.randn(HQ, NQ, D)), {}), ValueError, r"\bq must be 4-D"),
    "k-5d": (lambda: (with_(1, torch.randn(1, B, HKV, NK, D)), {}), ValueError, r"\bk must be 4-D"),
    "v-2d": (lambda: (with_(2, torch.randn(NK, D)), {}), ValueError, r"\bv must be 4-D"),
    "batch": (lambda: (with_(1, torch.randn(B + 1, HKV, NK, D)), {}), ValueError, r"batch.*\bk\b"),
    "head-dim-k": (lambda: (with_(1, torch.randn(B, HKV, NK, D + 2)), {}), ValueError, r"head dim.*\bk\b"),
    "head-dim-v": (lambda: (with_(2, torch.randn(B, HKV, NK, D + 2)), {}), ValueError, r"head dim.*\bv\b"),
    "v-shape": (lambda: (with_(2, torch.randn(B, HKV, NK + 1, D)), {}), ValueError, r"\bv must have the shape of k"),
    "gqa": (lambda: (qkv(hq=3, hkv=2), {}), ValueError, "multiple"),
    "hkv-0": (lambda: (qkv(hkv=0), {}), ValueError, "multiple"),
    "D>256": (lambda: (qkv(b=1, hq=1, hkv=1, nq=1, nk=1, d=257), {}), ValueError, r"head dim D=257"),
    "k-dtype": (lambda: (with_(1, torch.randn(B, HKV, NK, D, dtype=torch.float16)), {}), TypeError,
                r"\bk has dtype"),
    "v-dtype": (lambda: (with_(2, torch.randn(B, HKV, NK, D, dtype=torch.bfloat16)), {}), TypeError,
                r"\bv has dtype"),
    "int32": (lambda: ([x.to(torch.int32) for x in qkv()], {}), TypeError, r"\bq must be float16"),
    "k-meta": (lambda: (with_(1, torch.randn(B, HKV, NK, D, device="meta")), {}), ValueError, r"\bk is on meta"),
    "v-meta": (lambda: (with_(2, torch.randn(B, HKV, NK, D, device="meta")), {}), ValueError, r"\bv is on meta"),
    # flags and scalars
    "causal-int": (lambda: (qkv(), {"causal": 1}), TypeError, "causal"),
    "causal-str": (lambda: (qkv(), {"causal": "yes"}), TypeError, "causal"),
    "return_lse-int": (lambda: (qkv(), {"return_lse": 1}), TypeError, "return_lse"),
    "scale-str": (lambda: (qkv(), {"scale": "0.5"}), TypeError, "scale"),
    "scale-tensor": (lambda: (qkv(), {"scale": torch.tensor(0.5)}), TypeError, "scale"),
    "scale-bool": (lambda: (qkv(), {"scale": True}), TypeError, "scale"),
    "scale-nan": (lambda: (qkv(), {"scale": float("nan")}), ValueError, "scale"),
    "scale-inf": (lambda: (qkv(), {"scale": float("inf")}), ValueError, "scale"),
    "window-int": (lambda: (qkv(), {"window": 3}), ValueError, "window"),
    "window-str": (lambda: (qkv(), {"window": "ab"}), ValueError, "window"),
    "window-triple": (lambda: (qkv(), {"window": (1, 2, 3)}), ValueError, "window"),
    "window-negative": (lambda: (qkv(), {"window": (-1, 2)}), ValueError, "window left"),
    "window-float": (lambda: (qkv(), {"window": (2, 1.5)}), ValueError, "window right"),
    "window-bool": (lambda: (qkv(), {"window": (True, None)}), ValueError, "window left"),
    # positions
    "q_pos-float": (lambda: (qkv(), {"q_pos": torch.arange(NQ, dtype=torch.float32)}), TypeError, "q_pos"),
    "k_pos-bool": (lambda: (qkv(), {"k_pos": torch.ones(NK, dtype=torch.bool)}), TypeError, "k_pos"),
    "q_pos-list": (lambda: (qkv(), {"q_pos": list(range(NQ))}), TypeError, "q_pos"),
    "q_pos-length": (lambda: (qkv(), {"q_pos": torch.arange(NQ + 1)}), ValueError, "q_pos"),
    "q_pos-3d": (lambda: (qkv(), {"q_pos": torch.arange(NQ).view(1, 1, NQ)}), ValueError, "q_pos"),
    "q_pos-batch": (lambda: (qkv(), {"q_pos": torch.arange(NQ).repeat(B + 1, 1)}), ValueError, "q_pos"),
    "k_pos-length": (lambda: (qkv(), {"k_pos": torch.arange(NK - 1)}), ValueError, "k_pos"),
    "q_pos-meta": (lambda: (qkv(), {"q_pos": torch.arange(NQ, device="meta")}), ValueError, r"q_pos is on meta"),
    # rope
    "rope-str": (lambda: (qkv(), {"rope": "rope"}), TypeError, "rope"),
    "rope-odd-head-dim": (lambda: (qkv(d=5), {"rope": RoPE()}), ValueError, "rope: rotary dim must be even"),
    "rope-dim>D": (lambda: (qkv(), {"rope": RoPE(dim=D + 2)}), ValueError, "rope: rotary dim"),
    "rope-inv_freq>D": (lambda: (qkv(), {"rope": RoPE(inv_freq=torch.ones(D))}), ValueError, "rope: rotary dim"),
    # alibi
    "alibi-length": (lambda: (qkv(), {"alibi_slopes": torch.ones(HQ + 1)}), ValueError, "alibi_slopes"),
    "alibi-batch": (lambda: (qkv(), {"alibi_slopes": torch.ones(B + 1, HQ)}), ValueError, "alibi_slopes"),
    "alibi-3d": (lambda: (qkv(), {"alibi_slopes": torch.ones(1, B, HQ)}), ValueError, "alibi_slopes"),
    "alibi-int": (lambda: (qkv(), {"alibi_slopes": torch.ones(HQ, dtype=torch.int64)}), TypeError, "alibi_slopes"),
    "alibi-list": (lambda: (qkv(), {"alibi_slopes": [1.0] * HQ}), TypeError, "alibi_slopes"),
    "alibi-meta": (lambda: (qkv(), {"alibi_slopes": torch.ones(HQ, device="meta")}), ValueError, "alibi_slopes"),
    # rel_bias
    "rel_bias-tensor": (lambda: (qkv(), {"rel_bias": torch.zeros(HQ, 3)}), TypeError, "rel_bias"),
    "rel_bias-heads": (lambda: (qkv(), {"rel_bias": DistanceBias(torch.zeros(HQ + 1, 5), 2, 2)}), ValueError,
                       r"rel_bias\.table"),
    "rel_bias-meta": (lambda: (qkv(), {"rel_bias": DistanceBias(torch.zeros(HQ, 5, device="meta"), 2, 2)}),
                      ValueError, r"rel_bias\.table"),
    # bias
    "bias-int64": (lambda: (qkv(), {"bias": torch.zeros(NQ, NK, dtype=torch.int64)}), TypeError, "bias"),
    "bias-fp16-on-fp32": (lambda: (qkv(), {"bias": torch.zeros(NQ, NK, dtype=torch.float16)}), TypeError, "bias"),
    "bias-not-broadcastable": (lambda: (qkv(), {"bias": torch.zeros(B, HQ, NQ, NK + 1)}), ValueError, "bias"),
    "bias-wrong-heads": (lambda: (qkv(), {"bias": torch.zeros(HQ + 1, 1, 1)}), ValueError, "bias"),
    "bias-5d": (lambda: (qkv(), {"bias": torch.zeros(1, B, HQ, NQ, NK)}), ValueError, "bias"),
    "bias-array": (lambda: (qkv(), {"bias": [[0.0] * NK] * NQ}), TypeError, "bias"),
    "bias-meta": (lambda: (qkv(), {"bias": torch.zeros(NQ, NK, device="meta")}), ValueError, "bias is on meta"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=ENTRY_IDS)
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_argument(case, entry):
    make, exc, match = BAD[case]
    args, kwargs = make()
    with pytest.raises(exc, match=match):
        entry(*args, **kwargs)


@pytest.mark.parametrize("case", ["q-3d", "k-dtype", "gqa", "scale-str", "q_pos-batch", "rope-dim>D",
                                  "alibi-batch", "rel_bias-heads", "bias-5d", "k-meta"])
def test_same_error_from_both_entry_points(case):
    make, exc, _ = BAD[case]
    args, kwargs = make()
    errors = []
    for entry in ENTRY_POINTS:
        with pytest.raises(exc) as info:
            entry(*args, **kwargs)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("case", ["q-3d", "k-dtype", "bias-5d", "rope-str"])
def test_select_backend_validates(case):
    make, exc, match = BAD[case]
    args, kwargs = make()
    with pytest.raises(exc, match=match):
        posattn.select_backend(*args, **kwargs)


def test_huge_int_scale_raises_documented_error():
    with pytest.raises((TypeError, ValueError), match="scale"):
        posattn.reference.attention(*qkv(), scale=10 ** 400)


# ---------------------------------------------------------------- encoding constructors

@pytest.mark.parametrize("make, exc, match", [
    (lambda: RoPE(dim=3), ValueError, "dim"),
    (lambda: RoPE(dim=0), ValueError, "dim"),
    (lambda: RoPE(inv_freq=[1.0, 0.5]), TypeError, "inv_freq"),
    (lambda: RoPE(inv_freq=torch.ones(2, 2)), ValueError, "inv_freq"),
    (lambda: RoPE(inv_freq=torch.ones(0)), ValueError, "inv_freq"),
    (lambda: RoPE(inv_freq=torch.ones(2, dtype=torch.int64)), TypeError, "inv_freq"),
    (lambda: RoPE(inv_freq=torch.ones(2), dim=6), ValueError, "dim"),
    (lambda: RoPE(base=0), ValueError, "base"),
    (lambda: RoPE(attention_factor=float("nan")), ValueError, "attention_factor"),
    (lambda: DistanceBias(torch.zeros(HQ, 4), 2, 2), ValueError, r"left \+ right \+ 1"),
    (lambda: DistanceBias(torch.zeros(5), 2, 2), ValueError, r"left \+ right \+ 1"),
    (lambda: DistanceBias(torch.zeros(HQ, 3), -1, 3), ValueError, "left"),
    (lambda: DistanceBias(torch.zeros(HQ, 3), 1, 1.0), ValueError, "right"),
    (lambda: DistanceBias([[0.0] * 3] * HQ, 1, 1), TypeError, "table"),
    (lambda: DistanceBias(torch.zeros(HQ, 3, dtype=torch.int64), 1, 1), TypeError, "table"),
    (lambda: DistanceBias.t5(torch.zeros(31, HQ)), ValueError, "weight"),
    (lambda: DistanceBias.t5(torch.zeros(32)), ValueError, "weight"),
    (lambda: DistanceBias.t5(torch.zeros(8, HQ), num_buckets=8, max_distance=0), ValueError, "max_distance"),
    (lambda: DistanceBias.t5(torch.zeros(32, HQ), max_distance=8), ValueError, "max_distance"),
    (lambda: DistanceBias.t5(torch.zeros(2, HQ), num_buckets=2), ValueError, "num_buckets"),
    (lambda: posattn.alibi_slopes(0), ValueError, "num_heads"),
    (lambda: posattn.alibi_slopes("x"), ValueError, "num_heads"),
    (lambda: posattn.alibi_slopes(True), ValueError, "num_heads"),
])
def test_bad_encoding_constructor(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_alibi_slopes_values():
    s = posattn.alibi_slopes(8)
    assert s.dtype == torch.float32 and s.shape == (8,)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    s6 = posattn.alibi_slopes(6, dtype=torch.float64)  # 4 power-of-two slopes, then 2 interleaved from 8
    assert s6.dtype == torch.float64 and s6.shape == (6,)
    torch.testing.assert_close(s6[:4], posattn.alibi_slopes(4, dtype=torch.float64))
    torch.testing.assert_close(s6[4:], posattn.alibi_slopes(8, dtype=torch.float64)[0::2][:2])


def test_t5_table_shape():
    rb = DistanceBias.t5(torch.randn(32, HQ), max_distance=16)
    assert rb.table.shape == (HQ, 33) and (rb.left, rb.right) == (16, 16)
    rb = DistanceBias.t5(torch.randn(16, HQ), num_buckets=16, max_distance=16, bidirectional=False)
    assert rb.table.shape == (HQ, 17) and (rb.left, rb.right) == (16, 0)


# ---------------------------------------------------------------- backend selection

@pytest.fixture
def env(monkeypatch):
    """env, once triton and the kernels are imported under the process's own
    TRITON_INTERPRET: triton decides interpreter or not for its @jit functions (its own
    tl helpers included) when they are defined, so a first import while a test has
    flipped the variable would break every later kernel launch in the process."""
    try:
        import triton  # noqa: F401
        import posattn.kernels.attention  # noqa: F401
    except Exception:
        pass
    return monkeypatch


def test_reference_entry_point_rejects_other_backends():
    for backend in ("triton", "bogus"):
        with pytest.raises(ValueError, match="backend"):
            posattn.reference.attention(*qkv(), backend=backend)
    assert posattn.reference.attention(*qkv(), backend="reference").shape == (B, HQ, NQ, D)


@pytest.mark.parametrize("backend", ["bogus", "Triton", "", 1])
def test_unknown_backend(backend, env):
    env.delenv("POSATTN_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend"):
        posattn.attention(*qkv(), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        posattn.select_backend(*qkv(), backend=backend)


def test_bogus_env_backend(env):
    env.setenv("POSATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="POSATTN_BACKEND"):
        posattn.select_backend(*qkv())
    with pytest.raises(ValueError, match="POSATTN_BACKEND"):
        posattn.attention(*qkv())
    # an explicit backend wins over the environment
    assert posattn.select_backend(*qkv(), backend="reference") == "reference"


def test_env_backend_reference(env):
    env.setenv("POSATTN_BACKEND", "reference")
    env.setenv("TRITON_INTERPRET", "1")
    assert posattn.select_backend(*qkv()) == "reference"
    assert posattn.select_backend(*qkv(), causal=True, rope=RoPE()) == "reference"


def test_cpu_without_interpreter(env):
    pytest.importorskip("triton")  # without it the refusal says so instead
    env.delenv("POSATTN_BACKEND", raising=False)
    env.delenv("TRITON_INTERPRET", raising=False)
    assert posattn.select_backend(*qkv()) == "reference"
    assert posattn.select_backend(*qkv(), backend="reference") == "reference"
    with pytest.raises(ValueError, match=r"(?s)triton.*refused.*TRITON_INTERPRET"):
        posattn.attention(*qkv(), backend="triton")
    with pytest.raises(ValueError, match=r"(?s)triton.*refused.*TRITON_INTERPRET"):
        posattn.select_backend(*qkv(), backend="triton")
    env.setenv("POSATTN_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"triton.*refused"):
        posattn.select_backend(*qkv())
    # the automatic choice still runs (on the reference backend)
    env.delenv("POSATTN_BACKEND")
    assert posattn.attention(*qkv()).shape == (B, HQ, NQ, D)


@pytest.mark.parametrize("interpret", ["1", None])
def test_float64_goes_to_reference(interpret, env):
    env.delenv("POSATTN_BACKEND", raising=False)
    if interpret is None:
        env.delenv("TRITON_INTERPRET", raising=False)
    else:
        env.setenv("TRITON_INTERPRET", interpret)
    q, k, v = qkv(dtype=torch.float64)
    assert posattn.select_backend(q, k, v) == "reference"
    with pytest.raises(ValueError, match=r"(?s)triton.*refused.*float64"):
        posattn.attention(q, k, v, backend="triton")
    out = posattn.attention(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, posattn.reference.attention(q, k, v), rtol=0, atol=0)


def test_meta_tensors_refused_by_triton(env):
    env.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = qkv(device="meta")
    assert posattn.select_backend(q, k, v) == "reference"
    with pytest.raises(ValueError, match=r"triton.*refused.*meta"):
        posattn.attention(q, k, v, backend="triton")


def test_auto_selects_triton_on_kernel_device(device, env):
    env.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = qkv(device=device)
    if device == "cpu":  # the interpreter is on (see conftest.device)
        assert posattn.select_backend(q, k, v) == "triton"
    assert posattn.select_backend(q, k, v, causal=True, window=(3, None), rope=RoPE(dim=4)) == "triton"
    assert posattn.select_backend(q, k, v, backend="triton") == "triton"
    assert posattn.select_backend(q, k, v, backend="reference") == "reference"


def test_triton_backend_runs_and_returns_lse(device, env):
    env.delenv("POSATTN_BACKEND", raising=False)
    q, k, v = qkv(device=device)
    out, lse = posattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    ref_out, ref_lse = posattn.reference.attention(q, k, v, causal=True, return_lse=True, upcast=True)
    assert out.shape == (B, HQ, NQ, D) and out.dtype == torch.float32
    assert lse.shape == (B, HQ, NQ) and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- accepted forms (reference, CPU)

def run_ok(**kwargs):
    q, k, v = qkv()
    out = posattn.attention(q, k, v, backend="reference", **kwargs)
    o = out[0] if isinstance(out, tuple) else out
    assert o.shape == (B, HQ, NQ, D) and o.dtype == torch.float32
    assert not torch.isnan(o).any()
    return out


@pytest.mark.parametrize("kwargs", [
    {"causal": True},
    {"scale": 1},
    {"scale": 0.3},
    {"window": (None, 3)},
    {"window": [2, None]},
    {"window": (0, 0)},
    {"q_pos": torch.arange(NQ, dtype=torch.int32).repeat(B, 1)},
    {"k_pos": torch.arange(NK)},
    {"q_pos": torch.arange(NQ), "k_pos": torch.arange(NK)[None]},
    {"rope": RoPE()},
    {"rope": RoPE(dim=4, interleaved=True, base=100, attention_factor=1.5)},
    {"rope": RoPE(inv_freq=torch.tensor([1.0, 0.1]))},
    {"rope": RoPE(inv_freq=torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64), dim=8)},
    {"alibi_slopes": posattn.alibi_slopes(HQ)},
    {"alibi_slopes": posattn.alibi_slopes(HQ).repeat(B, 1)},
    {"alibi_slopes": posattn.alibi_slopes(HQ, dtype=torch.float16)},
    {"rel_bias": DistanceBias(torch.randn(HQ, 6), 3, 2)},
    {"rel_bias": DistanceBias.t5(torch.randn(32, HQ), max_distance=16), "scale": 1.0},
    {"bias": torch.randn(NK)},
    {"bias": torch.randn(NQ, 1)},
    {"bias": torch.randn(B, 1, NQ, NK)},
    {"bias": torch.tensor(0.5)},
    {"bias": torch.rand(NQ, NK) < 0.7},
    {"bias": torch.rand(B, HQ, NQ, NK) < 0.7, "causal": True},
    {"causal": True, "window": (2, None), "rope": RoPE(), "alibi_slopes": posattn.alibi_slopes(HQ),
     "rel_bias": DistanceBias(torch.randn(HQ, 3), 1, 1), "bias": torch.randn(HQ, 1, NK)},
], ids=lambda kw: "+".join(kw))
def test_accepted(kwargs):
    run_ok(**kwargs)


def test_return_lse():
    q, k, v = qkv()
    res = posattn.attention(q, k, v, return_lse=True, backend="reference")
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert out.shape == (B, HQ, NQ, D) and lse.shape == (B, HQ, NQ) and lse.dtype == torch.float32
    kk = k.repeat_interleave(HQ // HKV, dim=1)
    torch.testing.assert_close(lse, torch.logsumexp(q @ kk.transpose(-1, -2) / math.sqrt(D), dim=-1))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        _, lse = posattn.attention(*qkv(dtype=dtype), return_lse=True, backend="reference")
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # float64: not rounded


def test_simple_equivalences():
    q, k, v = qkv()
    plain = posattn.reference.attention(q, k, v)
    same = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, bias=torch.ones(NQ, NK, dtype=torch.bool)),
                               plain, **same)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, bias=torch.zeros(NK)), plain, **same)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, alibi_slopes=torch.zeros(B, HQ)), plain, **same)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, window=(None, None)), plain, **same)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, scale=1 / math.sqrt(D)), plain, **same)
    # default positions are bottom-right aligned: explicit int32 positions give the same result
    q_pos = torch.arange(NK - NQ, NK, dtype=torch.int32).repeat(B, 1)
    torch.testing.assert_close(posattn.reference.attention(q, k, v, causal=True, q_pos=q_pos),
                               posattn.reference.attention(q, k, v, causal=True), **same)
    # a column bias of -inf on the last key equals a bool mask hiding it
    col = torch.zeros(NK)
    col[-1] = float("-inf")
    torch.testing.assert_close(posattn.reference.attention(q, k, v, bias=col),
                               posattn.reference.attention(q, k, v, bias=torch.isfinite(col)), **same)


def test_fully_masked_rows_are_zero():
    q, k, v = qkv()
    mask = torch.ones(NQ, NK, dtype=torch.bool)
    mask[1] = False
    out, lse = posattn.reference.attention(q, k, v, bias=mask, return_lse=True)
    assert not torch.isnan(out).any()
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=ENTRY_IDS)
def test_empty_problems(entry):
    for shape in [dict(b=0), dict(nq=0), dict(nk=0), dict(hq=0)]:
        q, k, v = qkv(**shape)
        out, lse = entry(q, k, v, return_lse=True, backend="reference")
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert (out == 0).all() and torch.isneginf(lse).all()


def test_upcast_dtype_on_empty_problem():
    q, k, v = qkv(nq=0)
    out, lse = posattn.reference.attention(q, k, v, return_lse=True, upcast=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_upcast_returns_float64():
    out, lse = posattn.reference.attention(*qkv(), return_lse=True, upcast=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


# ---------------------------------------------------------------- reference vs SDPA (float64)

def sdpa(q, k, v, **kwargs):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kwargs)


def close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hq, hkv, nq, nk, d", [(2, 2, 16, 16, 8), (4, 1, 9, 23, 32), (3, 3, 33, 12, 5)])
def test_reference_matches_sdpa(hq, hkv, nq, nk, d):
    q, k, v = qkv(hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, dtype=torch.float64)
    close64(posattn.reference.attention(q, k, v), sdpa(q, k, v))
    close64(posattn.reference.attention(q, k, v, scale=0.7), sdpa(q, k, v, scale=0.7))
    bias = torch.randn(B, hq, nq, nk, dtype=torch.float64)
    close64(posattn.reference.attention(q, k, v, bias=bias), sdpa(q, k, v, attn_mask=bias))
    mask = torch.rand(nq, nk) < 0.8
    mask[:, 0] = True  # no empty row (SDPA gives NaN there)
    close64(posattn.reference.attention(q, k, v, bias=mask), sdpa(q, k, v, attn_mask=mask))


def test_reference_causal_matches_sdpa_square():
    q, k, v = qkv(nq=16, nk=16, dtype=torch.float64)
    close64(posattn.reference.attention(q, k, v, causal=True), sdpa(q, k, v, is_causal=True))


@pytest.mark.parametrize("nq, nk", [(5, 20), (1, 7), (20, 12)])
def test_reference_causal_bottom_right(nq, nk):
    q, k, v = qkv(nq=nq, nk=nk, dtype=torch.float64)
    q_pos = torch.arange(nk - nq, nk)
    keep = (torch.arange(nk)[None, :] - q_pos[:, None]) <= 0
    out = posattn.reference.attention(q, k, v, causal=True)
    rows = keep.any(-1)  # rows with no visible key (nq > nk): zeros here, NaN in SDPA
    close64(out[:, :, rows], sdpa(q, k, v, attn_mask=keep)[:, :, rows])
    assert (out[:, :, ~rows] == 0).all()


def test_reference_window_matches_sdpa():
    nq, nk = 10, 24
    q, k, v = qkv(nq=nq, nk=nk, dtype=torch.float64)
    rel = torch.arange(nk)[None, :] - torch.arange(nk - nq, nk)[:, None]
    keep = (rel >= -4) & (rel <= 2)
    close64(posattn.reference.attention(q, k, v, window=(4, 2)), sdpa(q, k, v, attn_mask=keep))
    close64(posattn.reference.attention(q, k, v, window=(4, 2), causal=True),
            sdpa(q, k, v, attn_mask=keep & (rel <= 0)))
