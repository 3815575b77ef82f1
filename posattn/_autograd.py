"""Autograd pieces shared by the fused backends (Triton, CUDA).

- :class:`FusedBackward` wraps a backend's fused backward (the first derivatives)
  so that it is itself differentiable: its backward, the second derivatives, goes
  through the reference's PyTorch ops. Double backward (gradient penalties,
  ``create_graph=True``, ``torch.autograd.gradgradcheck``) is then correct on every
  backend, at O(Nq * Nk) memory for that second pass only.
- ``refuse_vmap`` / ``refuse_jvp``: the fused kernels have no batching or
  forward-mode rule; ``torch.func.vmap`` / ``jvp`` get an error naming posattn
  (``torch.func.grad`` / ``vjp`` work: the Functions use ``setup_context``).
"""
from __future__ import annotations

import dataclasses

import torch

from ._validate import Problem

# The backends' parameter slots -> (encoding keyword, tensor name) (Problem.params()).
SLOTS = {"alibi": ("alibi_slopes", "alibi_slopes"), "table": ("rel_bias", "table"), "bias": ("bias", "bias"),
         "rel_key": ("rel_emb", "rel_key"), "rel_value": ("rel_emb", "rel_value"),
         "rel_u": ("rel_emb", "rel_content_bias"), "rel_w": ("rel_emb", "rel_position_bias")}


def problem_with(p: Problem, q, k, v, params: dict) -> Problem:
    """``p`` with its differentiable tensors replaced (same encodings, positions, masks);
    ``params`` maps slot names (``SLOTS``) to tensors (absent or None: keep)."""
    return p.with_tensors(q, k, v, {SLOTS[n]: t for n, t in params.items() if t is not None})


def _message(transform, backend, rule):
    return (f"posattn: torch.func.{transform} is not supported by the {backend!r} backend (its kernels have no "
            f"{rule} rule); use posattn.attention(..., backend='reference') inside torch.func.{transform}")


def refuse_vmap(backend):
    def vmap(info, in_dims, *args):
        raise NotImplementedError(_message("vmap", backend, "batching"))
    return vmap


def refuse_jvp(backend):
    def jvp(ctx, *tangents):
        raise NotImplementedError(_message("jvp", backend, "forward-mode"))
    return jvp


class FusedBackward(torch.autograd.Function):
    """forward: ``first(out, stats, q, k, v, dout, dlse, *params)``, the backend's fused
    gradients ``(dq, dk, dv, *params)`` of the attention at ``(q, k, v, *params)``
    along ``(dout, dlse)`` (``out`` / ``stats``: what its forward saved; every tensor
    passes through here, so torch.func transforms hand ``first`` plain tensors).
    backward: their derivatives along the incoming ``grad_grads``, from the
    reference's differentiable ops (rebuilt at the same point)."""

    @staticmethod
    def forward(p: Problem, names, first, out, stats, q, k, v, dout, dlse, *params):
        return tuple(first(out, stats, q, k, v, dout, dlse, *params))

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, names, first, out, stats, q, k, v, dout, dlse, *params = inputs
        ctx.problem, ctx.names = p, names
        ctx.save_for_backward(q, k, v, dout, dlse, *params)

    @staticmethod
    def backward(ctx, *grad_grads):
        from . import reference
        q, k, v, dout, dlse, *params = ctx.saved_tensors
        slots = [q, k, v, *params]                    # the forward's outputs are their gradients
        with torch.enable_grad():
            # One proxy per slot (a view keeps the graph, and `k is v` stays two slots):
            # the first derivatives rebuilt as a graph of the proxies and the cotangents...
            proxy = lambda t: None if t is None or not t.is_floating_point() else (  # noqa: E731
                t.view_as(t) if t.requires_grad else t.detach().requires_grad_())
            xs, cots = [proxy(t) for t in slots], [proxy(t) for t in (dout, dlse)]
            use = [x if x is not None else t for x, t in zip(xs, slots)]
            rp = problem_with(ctx.problem, use[0], use[1], use[2], dict(zip(ctx.names, use[3:])))
            out, lse = reference._run(dataclasses.replace(rp, return_lse=True), upcast=False)
            outs = [(o, c) for o, c in ((out, cots[0]), (lse, cots[1])) if c is not None]
            live = [x for x in xs if x is not None]
            firsts = iter(torch.autograd.grad([o for o, _ in outs], live, [c for _, c in outs],
                                              create_graph=True, allow_unused=True))
            first = [None if x is None else next(firsts) for x in xs]
            # ...differentiated along the incoming grad_grads.
            pairs = [(f, g) for f, g in zip(first, grad_grads) if f is not None and g is not None]
            targets = live + [c for c in cots if c is not None]
            seconds = torch.autograd.grad([f for f, _ in pairs], targets, [g for _, g in pairs],
                                          create_graph=torch.is_grad_enabled(), allow_unused=True) \
                if pairs else [None] * len(targets)
        seconds = iter(seconds)
        gx = [None if x is None else next(seconds) for x in xs]
        gc = [None if c is None else next(seconds) for c in cots]
        return (None, None, None, None, None, gx[0], gx[1], gx[2], gc[0], gc[1], *gx[3:])

    vmap = staticmethod(refuse_vmap("fused"))
