"""Unit tests of the benchmark's pure pieces and of the CPU smoke run (plain pytest, CPU).

    pytest bench/test_harness.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import harness  # noqa: E402
import peers  # noqa: E402
import posattn  # noqa: E402
import posattn.reference  # noqa: E402


# --------------------------------------------------------------------------
# FLOPs, shapes, protocol
# --------------------------------------------------------------------------

def test_flops_fa3_rule():
    # forward 4*B*H*N*N*D
    assert harness.attn_flops(2, 16, 8192, 8192, 128, False, "fwd") == 4 * 2 * 16 * 8192 * 8192 * 128
    # causal halves it
    assert harness.attn_flops(2, 16, 8192, 8192, 128, True, "fwd") == 2 * 2 * 16 * 8192 * 8192 * 128
    # fwd+bwd = 3.5 x forward (backward 2.5 x)
    assert harness.attn_flops(1, 1, 10, 20, 8, False, "fwd+bwd") == 3.5 * 4 * 10 * 20 * 8
    assert harness.attn_flops(1, 1, 10, 20, 8, True, "fwd+bwd") == 3.5 * 2 * 10 * 20 * 8
    with pytest.raises(ValueError):
        harness.attn_flops(1, 1, 1, 1, 1, False, "bwd")


def test_flops_constant_over_the_protocol_grid():
    # With B*N and H*D fixed, the forward count is 4 * tokens * N * hidden: it grows linearly in N.
    p = harness.full_protocol()
    for d in p.head_dims:
        for n in p.seqlens:
            b, h = p.shape(n, d)
            assert b * n == 16384 and h * d == 2048
            assert harness.attn_flops(b, h, n, n, d, False, "fwd") == 4 * 16384 * n * 2048


def test_tflops_and_fraction():
    assert harness.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert harness.tflops(2e12, 1.0) == pytest.approx(2000.0)
    assert harness.tflops(1e12, None) is None
    assert harness.tflops(1e12, 0.0) is None
    assert harness.tflops(1e12, float("nan")) is None
    assert harness.fraction(300.0, 600.0) == 0.5
    assert harness.fraction(None, 600.0) is None
    assert harness.fraction(1.0, 0.0) is None
    assert harness.matmul_flops(8192) == 2 * 8192 ** 3
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([1.0, 2.0]) == 1.5


def test_shape_for():
    assert harness.shape_for(16384, 2048, 512, 64) == (32, 32)
    assert harness.shape_for(16384, 2048, 16384, 128) == (1, 16)
    with pytest.raises(ValueError):
        harness.shape_for(16384, 2048, 3000, 64)
    with pytest.raises(ValueError):
        harness.shape_for(16384, 2048, 512, 96)


def test_protocols():
    full = harness.full_protocol()
    assert full.dtype == "bfloat16" and full.head_dims == (64, 128)
    assert full.seqlens == (512, 1024, 2048, 4096, 8192, 16384)
    assert set(full.causal) == {False, True} and full.modes == ("fwd", "fwd+bwd")
    assert full.matmul_n == 8192
    quick = harness.quick_protocol()
    assert quick.dn_pairs() == [(128, 8192), (64, 1024)]      # both head dims, N from 1k to 8k
    assert set(quick.head_dims) == {64, 128} and set(quick.seqlens) == {1024, 8192}
    assert quick.masks("none") == (False, True) and quick.masks("alibi") == (True,)
    assert full.masks("alibi") == (False, True) and len(full.dn_pairs()) == 12
    smoke = harness.smoke_protocol()
    assert smoke.seqlens == (128,) and "reference" in smoke.methods("none")
    assert "reference" not in full.methods("none")
    for enc in harness.ENCODINGS:
        assert full.methods(enc)[0] == "posattn"
    d = full.as_dict()
    json.dumps(d)
    assert d["shapes"]["D64/N512"] == {"B": 32, "H": 32}
    assert "3.5" in d["flops"]


def test_plan_ids_and_filters():
    full = harness.full_protocol()
    planned = harness.plan(full)
    n_methods = sum(len(full.methods(e)) for e in full.encodings)
    n_dec = len(full.methods("decode"))
    assert len(planned) == 2 * 6 * 2 * 2 * (n_methods - n_dec) + 2 * 6 * n_dec   # decode: full mask, fwd
    assert len({p.id for p in planned}) == len(planned)
    assert planned[0].id == "D64/N512/full/none/fwd/posattn"
    only = harness.plan(full, ["D128/", "/N4096/", "/causal/", "/alibi/", "/fwd+bwd/"])
    assert [p.method for p in only] == ["posattn", "posattn-alibi-fma", "flex", "dense-bias+sdpa-efficient"]
    assert all(p.B == 4 and p.H == 16 for p in only)
    fwd_only = harness.plan(full, ["/fwd/"])
    assert fwd_only and all(p.mode == "fwd" for p in fwd_only)
    assert harness.plan(full, ["no-such-row"]) == []
    assert harness.matches("a/b/c", None) and harness.matches("a/b/c", ["a/", "/c"])
    assert not harness.matches("a/b/c", ["a/", "d"])
    grouped = harness.groups(planned)
    assert len(grouped) == 2 * 6 * 2 * (len(harness.ENCODINGS) - 1) * 2 + 2 * 6
    assert all(len({p.group for p in g}) == 1 and g[0].method == "posattn" for g in grouped)
    # quick: 2 shapes; none with both masks, the other encodings causal only; 2 modes
    quick = harness.quick_protocol()
    planned = harness.plan(quick)
    per_mask = {e: len(quick.methods(e)) for e in quick.encodings}
    assert len(planned) == 2 * 2 * (2 * per_mask["none"] + per_mask["rope"] + per_mask["alibi"]
                                    + per_mask["distance"] + per_mask["softcap"] + per_mask["dropout"]) \
        + 2 * per_mask["decode"] == 110
    assert len(harness.groups(planned)) == 30
    assert [p.id for p in planned[:2]] == ["D128/N8192/full/none/fwd/posattn", "D128/N8192/full/none/fwd/sdpa-cudnn"]
    assert planned[-1].id == "D64/N1024/causal/dropout/fwd+bwd/sdpa-efficient"
    assert not [p for p in planned if p.encoding not in ("none", "decode") and not p.causal]
    assert {(p.causal, p.mode) for p in planned if p.encoding == "decode"} == {(False, "fwd")}
    assert all((p.B, p.H) == ((2, 16) if p.D == 128 else (16, 32)) for p in planned)
    d = quick.as_dict()
    json.dumps(d)
    assert list(d["shapes"]) == ["D128/N8192", "D64/N1024"]
    md = harness.render_markdown(ENV, d, {"n": 8192, "dtype": "bfloat16", "ms": None, "tflops": None}, [])
    assert "(D, N) in [(128, 8192), (64, 1024)]" in md and "causal only" in md


# --------------------------------------------------------------------------
# Rows, ratios, summary, memory
# --------------------------------------------------------------------------

def _p(method, enc="distance", mode="fwd+bwd", n=16384, d=128, causal=False):
    b, h = harness.shape_for(16384, 2048, n, d)
    return harness.Planned(d, n, b, h, causal, enc, mode, method)


def _rows():
    mm = 800.0
    r = [
        harness.make_row(_p("posattn"), status="ok", ms=10.0, peak_bytes=600 * harness.MIB, matmul_tflops=mm,
                         max_abs_diff=0.0),
        harness.make_row(_p("flex"), status="ok", ms=20.0, peak_bytes=700 * harness.MIB, matmul_tflops=mm),
        harness.make_row(_p("dense-bias+sdpa-efficient"), status="error",
                         note="OutOfMemoryError: CUDA out of memory.", matmul_tflops=mm),
        harness.make_row(_p("posattn", enc="none"), status="ok", ms=8.0, peak_bytes=512 * harness.MIB,
                         matmul_tflops=mm),
        harness.make_row(_p("sdpa-flash", enc="none"), status="ok", ms=6.0, peak_bytes=520 * harness.MIB,
                         matmul_tflops=mm),
        harness.make_row(_p("sdpa-cudnn", enc="none"), status="ok", ms=4.0, peak_bytes=520 * harness.MIB,
                         matmul_tflops=mm),
        harness.make_row(_p("flex", enc="none"), status="skipped", note="no backward", matmul_tflops=mm),
    ]
    return r


def test_make_row():
    r = _rows()[0]
    flops = 3.5 * 4 * 1 * 16 * 16384 * 16384 * 128
    assert r["flops"] == flops
    assert r["tflops"] == pytest.approx(flops / 1e-2 / 1e12)
    assert r["frac_matmul"] == pytest.approx(r["tflops"] / 800.0)
    assert r["peak_mib"] == 600
    assert r["id"] == "D128/N16384/full/distance/fwd+bwd/posattn"
    err = _rows()[2]
    assert err["ms"] is None and err["tflops"] is None and err["frac_matmul"] is None
    with pytest.raises(ValueError):
        harness.make_row(_p("x"), status="weird")
    # an error row never carries a time even if one is passed
    assert harness.make_row(_p("x"), status="error", ms=3.0)["ms"] is None


def test_error_note():
    e = RuntimeError("CUDA out of memory. Tried to allocate 16.00 GiB\nmore details\n")
    assert harness.error_note(e) == "RuntimeError: CUDA out of memory. Tried to allocate 16.00 GiB"
    assert harness.error_note(ValueError("")) == "ValueError"
    assert harness.error_note(RuntimeError("No available kernel"), "Flash attention requires D <= 256") == \
        "RuntimeError: No available kernel [Flash attention requires D <= 256]"
    assert len(harness.error_note(RuntimeError("x" * 1000))) <= 300


def test_ratios():
    rows = harness.add_ratios(_rows())
    by = {r["id"]: r for r in rows}
    assert by["D128/N16384/full/distance/fwd+bwd/posattn"]["vs_posattn"] == 1.0
    assert by["D128/N16384/full/distance/fwd+bwd/flex"]["vs_posattn"] == 2.0
    assert by["D128/N16384/full/distance/fwd+bwd/dense-bias+sdpa-efficient"]["vs_posattn"] is None
    assert by["D128/N16384/full/none/fwd+bwd/sdpa-cudnn"]["vs_posattn"] == 0.5


def test_ratios_without_posattn():
    rows = harness.add_ratios([r for r in _rows() if r["method"] != "posattn"])
    assert all(r["vs_posattn"] is None for r in rows)
    s = harness.summary(rows)
    assert all(x["posattn_ms"] is None and x["speedup_vs_best"] is None for x in s)


def test_summary():
    s = harness.summary(_rows())
    assert [x["encoding"] for x in s] == ["distance", "none"]
    dist, none = s
    assert dist["posattn_ms"] == 10.0
    assert dist["speedup"] == {"flex": 2.0, "dense-bias+sdpa-efficient": None}
    assert dist["best_peer"] == "flex" and dist["speedup_vs_best"] == 2.0
    assert none["speedup"] == {"sdpa-flash": 0.75, "sdpa-cudnn": 0.5, "flex": None}
    assert none["best_peer"] == "sdpa-cudnn" and none["speedup_vs_best"] == 0.5


def test_memory_table():
    m = harness.memory_table(_rows())
    assert len(m) == 1
    m = m[0]
    assert (m["N"], m["D"], m["causal"], m["mode"]) == (16384, 128, False, "fwd+bwd")
    assert m["posattn_none_mib"] == 512 and m["posattn_distance_mib"] == 600
    assert m["dense_bias_sdpa_mib"] is None and "OutOfMemoryError" in m["notes"]
    assert m["distance_over_none"] == pytest.approx(600 / 512)
    assert harness.memory_table([]) == []
    # another N: nothing there
    assert harness.memory_table(_rows(), n=512) == []


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

ENV = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-22", "commit": "abc123", "torch": "2.11.0",
       "triton": "3.6.0", "python": "3.12.3"}


def test_slug_and_stem():
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slug("NVIDIA H200") == "nvidia-h200"
    assert harness.slug("  ") == "unknown"
    assert harness.result_stem("NVIDIA H200", "2026-11-22") == "nvidia-h200_2026-11-22"
    assert harness.result_stem("NVIDIA H200", "2026-11-22", quick=True) == "nvidia-h200_2026-11-22_quick"
    assert harness.result_stem("NVIDIA H200", "2026-11-22", only=["D64/", "/alibi/"]) == \
        "nvidia-h200_2026-11-22_only-d64-alibi"
    import datetime as dt
    assert harness.utc_date(dt.datetime(2026, 1, 2, 23, 0, tzinfo=dt.timezone.utc)) == "2026-01-02"


def test_write_results(tmp_path):
    proto = harness.full_protocol().as_dict()
    matmul = {"n": 8192, "dtype": "bfloat16", "ms": 1.4, "tflops": 785.0, "note": ""}
    rows = _rows()
    rows[0]["max_abs_diff"] = float("nan")          # strict JSON has no NaN: written as a string
    paths = harness.write_results(str(tmp_path / "out"), "nvidia-h100_2026-11-22", ENV, proto, matmul, rows)
    assert sorted(os.listdir(tmp_path / "out")) == ["nvidia-h100_2026-11-22.json", "nvidia-h100_2026-11-22.md"]
    doc = json.loads(open(paths["json"]).read())
    assert doc["env"]["device"] == "NVIDIA H100 80GB HBM3"
    assert doc["env"]["commit"] == "abc123" and doc["env"]["torch"] == "2.11.0" and doc["env"]["triton"] == "3.6.0"
    assert doc["protocol"]["seqlens"] == [512, 1024, 2048, 4096, 8192, 16384]
    assert doc["protocol"]["tokens"] == 16384 and doc["protocol"]["hidden"] == 2048
    assert doc["complete"] is True and doc["smoke"] is False
    assert len(doc["rows"]) == len(rows) and doc["rows"][0]["max_abs_diff"] == "nan"
    assert doc["rows"][1]["vs_posattn"] == 2.0
    assert doc["summary"][0]["speedup"]["flex"] == 2.0
    assert doc["memory"][0]["posattn_distance_mib"] == 600
    md = open(paths["md"]).read()
    assert "NVIDIA H100 80GB HBM3" in md and "abc123" in md and "785.0 TFLOP/s" in md
    assert "## Summary" in md and "### distance" in md and "## Memory at N = 16384" in md
    assert "OutOfMemoryError: CUDA out of memory." in md
    assert "THE NUMBERS MEAN NOTHING" not in md and "Partial results" not in md
    # every table line has the same number of cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.replace("\\|", "").count("|") for ln in lines}) == 1, block
    # partial / smoke flags
    paths = harness.write_results(str(tmp_path / "out"), "s", ENV, proto, matmul, rows, smoke=True, complete=False)
    md = open(paths["md"]).read()
    assert "THE NUMBERS MEAN NOTHING" in md and "Partial results" in md
    assert json.loads(open(paths["json"]).read())["complete"] is False


def test_resume_helpers():
    full = harness.full_protocol()
    planned = harness.plan(full, ["D128/", "/N16384/", "/full/", "/fwd+bwd/"])
    grouped = harness.groups(planned)
    forward_full = [e for e in harness.ENCODINGS if e not in harness.FORWARD_FULL_ONLY]
    assert [g[0].encoding for g in grouped] == forward_full
    # previous run: the whole 'none' group, part of 'rope', and a row not in the plan
    prev = [harness.make_row(p, status="ok", ms=1.0) for p in grouped[0]]
    prev += [harness.make_row(grouped[1][0], status="ok", ms=1.0)]
    prev += [harness.make_row(_p("posattn", enc="none", n=512), status="ok", ms=1.0)]
    kept, todo = harness.split_resume(prev, grouped)
    assert [r["id"] for r in kept] == [p.id for p in grouped[0]]
    assert [g[0].encoding for g in todo] == forward_full[1:]
    assert not harness.is_complete(kept, planned)
    rows = [harness.make_row(p, status="ok", ms=1.0) for p in reversed(planned)]
    assert [r["id"] for r in harness.order_rows(rows, planned)] == [p.id for p in planned]
    assert harness.is_complete(rows, planned)


def test_load_results_roundtrip(tmp_path):
    paths = harness.write_results(str(tmp_path), "x", ENV, {}, {}, _rows())
    doc = harness.load_results(paths["json"])
    assert [r["id"] for r in doc["rows"]] == [r["id"] for r in _rows()]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError):
        harness.load_results(str(bad))


def test_git_commit(monkeypatch):
    monkeypatch.delenv("POSATTN_BENCH_COMMIT", raising=False)
    assert harness.git_commit(override="deadbeef") == "deadbeef"

    def ok(cmd, **kw):
        out = "0123abcd\n" if cmd[1] == "rev-parse" else ""
        return types.SimpleNamespace(returncode=0, stdout=out, stderr="")
    assert harness.git_commit(runner=ok) == "0123abcd"

    def dirty(cmd, **kw):
        out = "0123abcd\n" if cmd[1] == "rev-parse" else " M posattn/x.py\n"
        return types.SimpleNamespace(returncode=0, stdout=out, stderr="")
    assert harness.git_commit(runner=dirty) == "0123abcd-dirty"

    def missing(cmd, **kw):
        raise FileNotFoundError("git")
    assert harness.git_commit(runner=missing).startswith("unknown (git rev-parse HEAD failed: FileNotFoundError")

    def not_repo(cmd, **kw):
        return types.SimpleNamespace(returncode=128, stdout="", stderr="fatal: not a git repository")
    assert harness.git_commit(runner=not_repo).startswith("unknown")
    monkeypatch.setenv("POSATTN_BENCH_COMMIT", "fromenv")
    assert harness.git_commit(runner=missing) == "fromenv"


def test_git_commit_real_repo():
    c = harness.git_commit(os.path.dirname(HERE))
    assert c.startswith("unknown") or len(c.split("-")[0]) == 40


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------

def test_plot_series():
    rows = []
    for n, ms in ((1024, 2.0), (512, 1.0), (4096, 8.0)):
        rows.append(harness.make_row(_p("posattn", enc="alibi", n=n), status="ok", ms=ms))
    rows.append(harness.make_row(_p("flex", enc="alibi", n=512), status="error", note="x"))
    s = harness.plot_series(rows)
    assert list(s) == [(128, "alibi", False, "fwd+bwd")]
    assert [n for n, _ in s[(128, "alibi", False, "fwd+bwd")]["posattn"]] == [512, 1024, 4096]
    assert "flex" not in s[(128, "alibi", False, "fwd+bwd")]


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    said = []
    out = harness.write_plot(str(tmp_path / "p.png"), _rows(), log=said.append)
    assert out is None and not (tmp_path / "p.png").exists()
    assert "matplotlib is not importable" in said[0] and "skipped" in said[0]
    assert harness.write_plot(str(tmp_path / "q.png"), [], log=said.append) is None


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [harness.make_row(_p(m, enc=e, n=n, causal=c, mode=md), status="ok", ms=ms)
            for m, ms in (("posattn", 1.0), ("flex", 2.0)) for e in ("none", "alibi")
            for n in (512, 1024) for c in (False, True) for md in ("fwd", "fwd+bwd")]
    out = harness.write_plot(str(tmp_path / "p.png"), rows, title="t", matmul_tflops=800.0)
    assert out and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------
# The peers compute what posattn computes (float32, CPU, SDPA free to dispatch)
# --------------------------------------------------------------------------

def _fresh(enc, causal, mode, seed=1, N=48, D=16, H=3, B=2):
    if enc == "decode":   # query heads in groups of harness.DECODE_GROUP
        H = harness.DECODE_GROUP
    return peers.make_inputs(B, H, N, D, causal=causal, encoding=enc, mode=mode, dtype=torch.float32,
                             device="cpu", seed=seed, left=5, right=7)


def _oracle(enc, causal, mode):
    inp = _fresh(enc, causal, mode)
    out = posattn.reference.attention(inp.q, inp.k, inp.v, upcast=True, **peers._posattn_kwargs(inp))
    grads = None
    if mode == "fwd+bwd":
        out.backward(inp.dout.double())
        grads = [t.grad.clone() for t in inp.leaves()]
    return out.detach(), grads


@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("enc", harness.ENCODINGS)
def test_peers_match_reference(enc, causal, mode):
    if enc in harness.FORWARD_FULL_ONLY and causal:
        pytest.skip("decode rows are full-mask only (SDPA's is_causal aligns one query top-left)")
    if enc == "dropout":  # each method draws its own mask: run, shapes, and mean over the mask
        for method in [m for m in harness.METHODS[enc]] + ["reference"]:
            inp = _fresh(enc, causal, mode)
            b = peers.build(method, inp, force_backends=False)
            assert b.skip is None, (method, b.skip)
            with b.context():
                out = b.fn()
            assert out.shape == inp.q.shape and torch.isfinite(out).all(), method
        return
    ref_out, ref_grads = _oracle(enc, causal, mode)
    methods = [m for m in harness.METHODS[enc] if m != "flex"] + ["reference"]
    for method in methods:
        inp = _fresh(enc, causal, mode)
        b = peers.build(method, inp, force_backends=False)
        assert b.skip is None, (method, b.skip)
        with b.context():
            out = b.fn()
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4, msg=lambda m: f"{method} out: {m}")
        if mode == "fwd+bwd":
            assert len(inp.leaves()) == (4 if enc == "distance" else 3)
            for t, g in zip(inp.leaves(), ref_grads):
                torch.testing.assert_close(t.grad.double(), g.double(), atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{method} grad: {m}")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("enc", ("none", "alibi", "distance", "softcap"))
def test_flex_score_mods_match_reference(enc, causal):
    """The FlexAttention score_mods and block mask (eager flex here; compiled in the smoke run)."""
    ref_out, _ = _oracle(enc, causal, "fwd")
    inp = _fresh(enc, causal, "fwd")
    b = peers.build_flex(inp, compiled=False)
    torch.testing.assert_close(b.fn().double(), ref_out, atol=2e-5, rtol=1e-4)
    assert peers.build_flex(_fresh(enc, causal, "fwd+bwd")).skip == "FlexAttention has no backward on CPU"


def test_dense_bias_shape_and_causal():
    inp = _fresh("distance", True, "fwd", N=10, B=3)
    bias = peers.dense_bias(inp)
    assert bias.shape == (3, 3, 10, 10) and bias.stride(0) == 0          # expanded, not copied over B
    rel = torch.arange(10)[None, :] - torch.arange(10)[:, None]
    expect = inp.table[:, (rel.clamp(-5, 7) + 5)].masked_fill(rel > 0, float("-inf"))
    assert torch.equal(bias[1], expect)
    inp = _fresh("alibi", False, "fwd", N=10)
    assert torch.equal(peers.dense_bias(inp)[0], -inp.slopes[:, None, None] * rel.abs().float())


def test_rope_tables_match_posattn_rope():
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    cos, sin = peers.rope_tables(9, 8, 10000.0, torch.float64, "cpu")
    ours = peers.torch_rope(x, cos, sin)
    inv = posattn.RoPE(base=10000.0).inv_freq_for(8, "cpu")
    ref = posattn.reference.apply_rope(x, torch.arange(9)[None], inv, False, 1.0, torch.float64)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_unknown_method():
    with pytest.raises(ValueError):
        peers.build("nope", _fresh("none", False, "fwd"))


# --------------------------------------------------------------------------
# run.py at tiny size on CPU
# --------------------------------------------------------------------------

def _run(args, tmp_path, **env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, os.path.join(HERE, "run.py")] + args, capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(HERE))


def test_run_list(tmp_path):
    res = _run(["--list", "--only", "/alibi/"], tmp_path)
    assert res.returncode == 0, res.stderr
    ids = [ln for ln in res.stdout.splitlines() if ln.startswith("D")]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --list shows the full protocol")
    assert ids == [p.id for p in harness.plan(harness.smoke_protocol(), ["/alibi/"])]
    assert "THE NUMBERS MEAN NOTHING" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is what runs without a GPU")
def test_cpu_smoke_run(tmp_path):
    """The whole CPU smoke run (what `make bench` does without a GPU), into tmp_path."""
    results = os.path.join(HERE, "results")
    before = sorted(os.listdir(results)) if os.path.isdir(results) else None
    out = tmp_path / "out"
    res = _run(["--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "CPU SMOKE RUN" in res.stdout and "THE NUMBERS MEAN NOTHING" in res.stdout
    after = sorted(os.listdir(results)) if os.path.isdir(results) else None
    assert before == after, "the smoke run must not write into bench/results/"
    files = sorted(os.listdir(out))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and next(iter(stems)).startswith("cpu-smoke_")
    doc = json.load(open(out / [f for f in files if f.endswith(".json")][0]))
    assert doc["smoke"] is True and doc["complete"] is True
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["commit"]
    rows = {r["id"]: r for r in doc["rows"]}
    planned = harness.plan(harness.smoke_protocol())
    assert [r["id"] for r in doc["rows"]] == [p.id for p in planned]
    # posattn and the reference ran everywhere; the CUDA-only SDPA backends are error rows, not crashes;
    # FlexAttention's backward is a skipped row on CPU
    for p in planned:
        r = rows[p.id]
        if p.method in ("posattn", "reference"):
            assert r["status"] == "ok", r
            assert r["tflops"] > 0
        if p.method == "flex":
            assert r["status"] == ("skipped" if p.mode == "fwd+bwd" else "ok"), r
        if p.method in ("sdpa-efficient", "dense-bias+sdpa-efficient", "sdpa-cudnn"):
            assert r["status"] == "error" and r["note"].startswith("RuntimeError"), r
        if r["status"] == "ok" and p.encoding != "dropout":   # every method computes what posattn computes (bf16)
            assert r["max_abs_diff"] is not None and r["max_abs_diff"] < 0.1, r
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert rows["D64/N128/full/none/fwd/posattn"]["backend"] == ("triton (interpreter)" if interpreted
                                                                 else "reference")
    md = open(out / [f for f in files if f.endswith(".md")][0]).read()
    assert "THE NUMBERS MEAN NOTHING" in md

    # --resume: nothing left to measure, the file is rewritten unchanged in rows
    res = _run(["--resume", str(out / (next(iter(stems)) + ".json")), "--no-plot"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"0 of {len(harness.groups(planned))} groups to measure" in res.stdout
    doc2 = json.load(open(out / (next(iter(stems)) + ".json")))
    assert [r["id"] for r in doc2["rows"]] == [r["id"] for r in doc["rows"]]
    assert doc2["env"]["resumed_from"][0]["started_utc"] == doc["env"]["started_utc"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is what runs without a GPU")
def test_max_minutes_then_resume(tmp_path):
    out = tmp_path / "out"
    args = ["--only", "/none/", "--only", "/fwd/", "--out", str(out), "--no-plot"]
    res = _run(args + ["--max-minutes", "0"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PARTIAL" in res.stdout
    (path,) = [out / f for f in os.listdir(out) if f.endswith(".json")]
    doc = json.load(open(path))
    assert doc["complete"] is False and doc["rows"] == []
    res = _run(["--only", "/none/", "--only", "/fwd/", "--resume", str(path), "--no-plot"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.load(open(path))
    assert doc["complete"] is True and len(doc["rows"]) == 12


# --------------------------------------------------------------------------
# run.py's measuring functions (CUDA calls faked: their arguments, not the GPU)
# --------------------------------------------------------------------------

def test_time_ms_cuda_uses_do_bench_median(monkeypatch):
    import triton.testing

    import run
    seen = {}

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        seen.update(warmup=warmup, rep=rep, grads=grad_to_none, mode=return_mode)
        fn()
        return 1.25
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    t = torch.zeros(1, requires_grad=True)
    calls = []
    ms = run.time_ms(lambda: calls.append(1), torch.device("cuda"), harness.full_protocol(), [t])
    assert ms == 1.25 and calls == [1]
    assert seen == {"warmup": 25, "rep": 100, "grads": [t], "mode": "median"}


def test_time_ms_cpu_resets_grads():
    import run
    t = torch.zeros(1, requires_grad=True)
    seen = []

    def fn():
        seen.append(t.grad)
        t.grad = torch.ones(1)
    ms = run.time_ms(fn, torch.device("cpu"), harness.smoke_protocol(), [t])
    assert ms >= 0 and seen == [None] * harness.smoke_protocol().cpu_reps


def test_peak_memory_cuda_protocol(monkeypatch):
    import run
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 300)
    peak, base = run.peak_memory(lambda: log.append("call"), torch.device("cuda"), [])
    assert (peak, base) == (300, 100)
    assert log.index("empty") < log.index("reset") < log.index("call") < len(log) - 1 and log[-1] == "sync"
    assert run.peak_memory(lambda: None, torch.device("cpu"), []) == (None, None)


def test_measure_failure_is_a_row(monkeypatch):
    import warnings

    import run
    p = harness.Planned(16, 32, 1, 2, False, "none", "fwd", "sdpa-flash")
    inp = _fresh("none", False, "fwd", N=32, D=16, H=2, B=1)

    def boom():
        warnings.warn("Flash attention kernel not used because:")
        warnings.warn("Flash attention requires q, k, v on CUDA")
        raise RuntimeError("No available kernel. Aborting execution.\nmore")
    monkeypatch.setattr(peers, "build", lambda m, i: peers.Bench(boom, "sdpa:FLASH_ATTENTION"))
    row, out = run.measure(p, inp, torch.device("cpu"), harness.smoke_protocol(), 1.0, None)
    assert out is None and row["status"] == "error" and row["ms"] is None
    assert row["note"] == ("RuntimeError: No available kernel. Aborting execution. [Flash attention kernel not "
                           "used because: Flash attention requires q, k, v on CUDA]")
    monkeypatch.setattr(peers, "build", lambda m, i: peers.Bench(None, "flex", skip="why"))
    row, _ = run.measure(p, inp, torch.device("cpu"), harness.smoke_protocol(), 1.0, None)
    assert row["status"] == "skipped" and row["note"] == "why"

    def bad_build(m, i):
        raise ValueError("unknown method")
    monkeypatch.setattr(peers, "build", bad_build)
    row, _ = run.measure(p, inp, torch.device("cpu"), harness.smoke_protocol(), 1.0, None)
    assert row["status"] == "error" and row["note"] == "ValueError: unknown method"


def test_measure_ok_row():
    import run
    p = harness.Planned(16, 32, 1, 2, True, "alibi", "fwd+bwd", "posattn")
    inp = _fresh("alibi", True, "fwd+bwd", N=32, D=16, H=2, B=1)
    row, out = run.measure(p, inp, torch.device("cpu"), harness.smoke_protocol(), 1.0, None)
    assert row["status"] == "ok" and row["ms"] > 0 and out.shape == (1, 2, 32, 16)
    assert all(t.grad is None for t in inp.leaves())        # reset after measuring
    row2, _ = run.measure(harness.Planned(16, 32, 1, 2, True, "alibi", "fwd+bwd", "reference"), inp,
                          torch.device("cpu"), harness.smoke_protocol(), 1.0, out)
    assert row2["status"] == "ok" and row2["max_abs_diff"] < 1e-4


def test_posattn_variants_are_not_peers():
    """posattn's own variants (posattn-alibi-fma) get a ratio, but never the best peer's
    place, and their failures count as posattn's."""
    mm = 800.0
    rows = [harness.make_row(_p("posattn", enc="alibi"), status="ok", ms=10.0, matmul_tflops=mm),
            harness.make_row(_p("posattn-alibi-fma", enc="alibi"), status="ok", ms=9.0, matmul_tflops=mm),
            harness.make_row(_p("flex", enc="alibi"), status="ok", ms=20.0, matmul_tflops=mm)]
    s, = harness.summary(rows)
    assert s["speedup"] == {"posattn-alibi-fma": 0.9, "flex": 2.0}
    assert s["best_peer"] == "flex" and s["speedup_vs_best"] == 2.0
    rows[1] = harness.make_row(_p("posattn-alibi-fma", enc="alibi"), status="error", note="boom", matmul_tflops=mm)
    assert [r["method"] for r in harness.failures(rows, harness.POSATTN)] == ["posattn-alibi-fma"]
