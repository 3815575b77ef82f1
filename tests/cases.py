"""One registry of encoding cases for the tests: name -> a builder of
posattn.attention keyword arguments that exercises every option of an encoding.

Every keyword registered in posattn.encodings must appear in some case
(tests/test_design.py checks it), so a new encoding (or a new option) is picked up
by the tests that read this registry: the operators' round trip (test_design) and
the reference-vs-kernel sweep (test_design's test_cases_on_the_triton_backend).
"""
import torch

import posattn


def _rope(H, D, Nq, Nk, device, dtype):
    return dict(rope=posattn.RoPE(dim=D // 2, base=500.0, interleaved=True, attention_factor=1.3), causal=True)


def _rope_inv_freq(H, D, Nq, Nk, device, dtype):
    return dict(rope=posattn.RoPE(inv_freq=torch.rand(D // 4, device=device)), window=(3, 2))


def _rope_axes(H, D, Nq, Nk, device, dtype):
    pairs = D // 4       # multi-axis RoPE: two axes, positions per axis (shared by the batch)
    return dict(rope=posattn.RoPE(dim=D // 2, base=200.0, sections=(pairs // 2, pairs - pairs // 2)), causal=True,
                rope_pos=(torch.randint(0, 3 * Nk, (2, Nq), device=device),
                          torch.randint(0, 3 * Nk, (1, 2, Nk), device=device)))


def _alibi(H, D, Nq, Nk, device, dtype):
    return dict(alibi_slopes=torch.rand(1, H, device=device).requires_grad_(),
                q_pos=torch.arange(Nq, device=device) * 2, k_pos=torch.arange(Nk, device=device))


def _distance(H, D, Nq, Nk, device, dtype):
    return dict(rel_bias=posattn.DistanceBias(torch.randn(H, 6, device=device).requires_grad_(), 3, 2))


def _grid(H, D, Nq, Nk, device, dtype):
    ww = 4
    wh = -(-Nk // ww)
    return dict(rel_bias=posattn.GridBias(torch.randn((2 * wh - 1) * (2 * ww - 1), H, device=device)
                                          .requires_grad_(), (wh, ww)))


def _dense(H, D, Nq, Nk, device, dtype):
    return dict(bias=torch.randn(1, H, Nq, Nk, device=device, dtype=dtype).requires_grad_())


def _mask(H, D, Nq, Nk, device, dtype):
    keep = torch.rand(Nq, Nk, device=device) < 0.7
    keep[:, -1] = True
    return dict(bias=keep)


def _shaw_xl(H, D, Nq, Nk, device, dtype):
    def r(*shape):
        return (0.3 * torch.randn(*shape, device=device)).requires_grad_()
    return dict(rel_emb=posattn.RelativeEmbeddings(r(1, 5, D), r(1, 5, D), 2, r(H, D), r(H, D)))


def _kerple(H, D, Nq, Nk, device, dtype):
    return dict(kerple=posattn.KERPLE((0.5 + torch.rand(H, device=device)).requires_grad_(),
                                      (0.1 + torch.rand(H, device=device)).requires_grad_()), causal=True)


def _softcap_sinks(H, D, Nq, Nk, device, dtype):
    return dict(softcap=3.0, sinks=torch.randn(H, device=device).requires_grad_(), window=(4, 1))


CASES = {
    "rope": _rope,
    "rope-inv-freq": _rope_inv_freq,
    "rope-axes": _rope_axes,
    "alibi+positions": _alibi,
    "distance-bias": _distance,
    "grid-bias": _grid,
    "dense-bias": _dense,
    "mask": _mask,
    "shaw+xl": _shaw_xl,
    "kerple": _kerple,
    "softcap+sinks": _softcap_sinks,
}
