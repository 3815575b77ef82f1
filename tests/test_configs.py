"""Launch configurations by architecture (posattn/_triton.py _config) and the offline
autotune list (bench/tune.py): what can be checked without a GPU. That the
configurations fit each architecture's shared memory is tests/test_aot_compile.py's."""
import importlib.util
from pathlib import Path

import pytest
import torch

from posattn import _triton, _tuned

TUNE = Path(__file__).resolve().parents[1] / "bench" / "tune.py"


def _tune_module():
    spec = importlib.util.spec_from_file_location("posattn_bench_tune", TUNE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256])
def test_small_shared_memory_parts_get_smaller_configs(D, backward):
    for fp32 in (False, True):
        big = _triton._config(D, backward, gpu=True, fp32=fp32, arch=(9, 0))
        small = _triton._config(D, backward, gpu=True, fp32=fp32, arch=(8, 6))
        assert big == _triton._config(D, backward, gpu=True, fp32=fp32, arch=(8, 0))
        bm, bn, bd, warps, stages = small
        assert bd == big[2] and stages == max(1, big[4] - 1) and bm <= big[0] and bn <= big[1]
        assert _triton._config(D, backward, gpu=False, arch=(8, 6))[:2] == (64, 32)   # the interpreter's


def test_arch_is_asked_at_launch_and_can_be_targeted(monkeypatch):
    assert _triton._arch(torch.device("cpu")) == (9, 0)
    monkeypatch.setattr(_triton, "TARGET_ARCH", (8, 6))
    assert _triton._arch(torch.device("cpu")) == (8, 6)
    assert _triton._shared_bytes((8, 6)) < _triton._shared_bytes((8, 0)) < _triton._shared_bytes((9, 0))
    assert _triton._shared_bytes((7, 5)) == _triton._shared_bytes((8, 6))   # unknown older parts: the small budget


def test_tuned_configs_replace_the_default_on_their_arch_only(monkeypatch):
    monkeypatch.setattr(_tuned, "TUNED", {"sm_90": {"fwd/w64": (64, 32, 8, 2), "bwd-rel/w128": (32, 32, 4, 2)}})
    assert _triton._config(64, False, gpu=True, arch=(9, 0)) == (64, 32, 64, 8, 2)
    assert _triton._config(100, True, rel_emb=True, gpu=True, arch=(9, 0)) == (32, 32, 128, 4, 2)
    assert _triton._config(64, False, gpu=True, arch=(8, 0)) == (128, 64, 64, 4, 3)    # the default
    assert _triton._config(64, False, gpu=True, fp32=True, arch=(9, 0)) != (64, 32, 64, 8, 2)   # width 128


@pytest.mark.parametrize("rel_emb", [False, True])
def test_candidates_start_with_the_default(rel_emb):
    for D in (32, 64, 128):
        for backward in (False, True):
            c = _triton.candidates(D, backward, rel_emb)
            bm, bn, _, warps, stages = _triton._config(D, backward, rel_emb, gpu=True)
            assert c[0] == (bm, bn, warps, stages) and len(set(c)) == len(c)
            assert all(m in ((32, 64) if backward else (64, 128)) for m, *_ in c[1:]) or rel_emb


def test_tune_kinds_cover_every_config_key():
    """bench/tune.py times D = 256 and the relative-embedding launches too: each kind is
    the key _config reads, and its problem carries Shaw / Transformer-XL tables."""
    tune = _tune_module()
    kinds = {k: (D, bwd, rel) for k, D, bwd, rel in tune.kinds()}
    assert {"fwd/w256", "bwd/w256", "fwd-rel/w64", "bwd-rel/w128"} <= set(kinds)
    q, k, v, dout, kw = tune._problem(64, 256, "cpu", rel=True)
    assert kw["rel_emb"].clip == 64 and kw["rel_emb"].key.shape == (32, 129, 64) and dout.shape == q.shape
    assert (64, 64, 8, 1) in _triton.candidates(128, True, rel_emb=True)


def test_tune_script_without_gpu_and_its_writer(tmp_path, monkeypatch, capsys):
    tune = _tune_module()
    if not torch.cuda.is_available():
        assert tune.main([]) == 0 and "nothing to tune" in capsys.readouterr().out
    path = tmp_path / "_tuned.py"
    path.write_text(Path(_tuned.__file__).read_text())
    tune.write("sm_86", {"fwd/w64": [128, 32, 4, 2]}, path)
    tune.write("sm_90", {"bwd/w128": (64, 64, 4, 2)}, path)
    ns = {}
    exec(path.read_text(), ns)
    assert ns["TUNED"] == {"sm_86": {"fwd/w64": (128, 32, 4, 2)}, "sm_90": {"bwd/w128": (64, 64, 4, 2)}}


def test_what_no_config_fits_is_refused_with_its_reason(monkeypatch):
    """Shaw in float32 with D = 256 on a 99 KiB part: refused by name, never a launch failure."""
    import posattn
    from posattn import _validate
    q = torch.randn(1, 2, 8, 256)
    rel = posattn.RelativeEmbeddings(torch.randn(2, 5, 256), None, 2)
    p = _validate.check(q, q, q, rel_emb=rel)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    monkeypatch.setattr(_triton, "TARGET_ARCH", (8, 6))
    assert "need more shared memory than this GPU's 99 KiB" in _triton.refusal(p)
    monkeypatch.setattr(_triton, "TARGET_ARCH", (9, 0))
    assert "shared memory" not in (_triton.refusal(p) or "")
    p16 = _validate.check(q.half(), q.half(), q.half(), rel_emb=rel)
    monkeypatch.setattr(_triton, "TARGET_ARCH", (8, 6))
    assert "shared memory" not in (_triton.refusal(p16) or "")


@pytest.mark.parametrize("nq,bm", [(49, 64), (144, 64), (576, 64), (1000, 128), (2048, 128), (4160, 128)])
def test_short_queries_get_64_row_blocks(nq, bm, monkeypatch):
    """The GPU forward takes 64-row blocks on one warpgroup when that computes at least
    10 % fewer padding rows (Swin's 49-token windows: 64 rows instead of 128), even where
    128-row blocks take two warpgroups (GridBias); the backward keeps its tiles."""
    from posattn import _validate
    from posattn.encodings import GridBias
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    nk = max(nq, 2048)
    q = torch.randn(1, 2, nq, 32)
    k = torch.randn(1, 2, nk, 32)
    wh = -(-nk // 64)
    for kw in ({}, dict(rel_bias=GridBias(torch.randn((2 * wh - 1) * 127, 2), (wh, 64)))):
        p = _validate.check(q, k, k, **kw)
        L = _triton._Launch(p, q, *_triton._launch_params(p))
        got, bn, _, launch = L.config(backward=False)
        assert got == bm and (launch["num_warps"] == 4 or bm == 128)
        assert L.config(backward=True)[:2] == _triton._config(32, True, gpu=True)[:2]
    wide = torch.randn(1, 2, nq, 128, dtype=torch.bfloat16)   # rows of 128 columns keep 128-row blocks
    p = _validate.check(wide, wide, wide)
    assert _triton._Launch(p, wide, *_triton._launch_params(p)).config(backward=False)[0] == 128


def test_grid_bias_alone_takes_128x128_tiles_on_hopper(monkeypatch):
    """GridBias alone at default positions reads its table without an index per score
    in every forward tile (compile-time offsets at a power-of-two width, vectors of keys
    at another even one, a line per query column at an odd one): on Hopper, 128x128
    tiles on two warpgroups. Lines past their memory budget, explicit positions or a
    dense bias beside it gather per score: 128x64 on two (static sm_90 model: 4 warps or
    128-key tiles spill there); Ampere keeps its tiles."""
    from posattn import _validate
    from posattn.encodings import GridBias
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    q = torch.randn(1, 2, 1000, 64, dtype=torch.bfloat16)
    pow2 = GridBias(torch.randn(31 * 127, 2), (16, 64))

    def tiles(**kw):
        p = _validate.check(q, q, q, **kw)
        bm, bn, _, launch = _triton._Launch(p, q, *_triton._launch_params(p)).config(backward=False)
        return bm, bn, launch["num_warps"]

    assert tiles(rel_bias=pow2) == (128, 128, 8)
    assert tiles(rel_bias=pow2, causal=True) == (128, 128, 8)
    assert tiles(rel_bias=GridBias(torch.randn(49 * 79, 2), (25, 40))) == (128, 128, 8)
    assert tiles(rel_bias=GridBias(torch.randn(51 * 77, 2), (26, 39))) == (128, 128, 8)
    assert tiles(rel_bias=GridBias(torch.randn(3997, 2), (1, 1999))) == (128, 64, 8)   # past the lines' budget
    pos = torch.arange(1000)
    assert tiles(rel_bias=pow2, q_pos=pos, k_pos=pos) == (128, 64, 8)
    assert tiles(rel_bias=pow2, bias=torch.randn(1000, 1000, dtype=torch.bfloat16)) == (128, 64, 8)
    monkeypatch.setattr(_triton, "GRID_WIDE_TILES", False)   # (a GPU A/B's switch: the tiles before)
    assert tiles(rel_bias=pow2) == (128, 64, 4)
    assert tiles(rel_bias=GridBias(torch.randn(49 * 79, 2), (25, 40))) == (128, 64, 8)
    monkeypatch.setattr(_triton, "GRID_WIDE_TILES", True)
    monkeypatch.setattr(_triton, "TARGET_ARCH", (8, 0))
    assert tiles(rel_bias=pow2)[:2] == (128, 64)
    assert tiles(rel_bias=GridBias(torch.randn(49 * 79, 2), (25, 40)))[1:] == (64, 8)


def test_softcap_forward_takes_two_warpgroups(monkeypatch):
    """A soft cap's tanh makes the forward MUFU-bound on one warpgroup or two (static
    sm_90 model, D=64: 2112 cycles per 128x128 block either way); on one, a causal mask
    and sinks beside it spilled 4 B, so rows of at most 64 columns take two."""
    from posattn import _validate
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    q = torch.randn(1, 2, 1000, 64, dtype=torch.bfloat16)
    for kw in (dict(softcap=30.0), dict(softcap=30.0, causal=True, sinks=torch.randn(2))):
        p = _validate.check(q, q, q, **kw)
        assert _triton._Launch(p, q, *_triton._launch_params(p)).config(backward=False)[3]["num_warps"] == 8
    p = _validate.check(q, q, q)
    assert _triton._Launch(p, q, *_triton._launch_params(p)).config(backward=False)[3]["num_warps"] == 4
