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
        # names: the (keyword, tensor name) of each of params, as in Problem.params()
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
        live = [i for i, t in enumerate(slots) if t is not None and t.is_floating_point()]
        p, names = ctx.problem, ctx.names
        keep = None
        if p.dropout_p > 0:  # the kernels' keep-mask, for the reference's recomputation
            from . import _dropout
            keep = _dropout.keep_mask_for(p)

        def first(*ins):
            """The first derivatives at ``ins`` (the live slots, then dout [, dlse]) from
            the reference's ops: torch.func.vjp, so that this composes with autograd
            (create_graph) and with torch.func transforms (grad of grad) alike."""
            xs, cot = ins[:len(live)], ins[len(live):]

            def attend(*xs):
                use = list(slots)
                for i, x in zip(live, xs):
                    use[i] = x
                rp = p.with_tensors(use[0], use[1], use[2],
                                    {n: t for n, t in zip(names, use[3:]) if t is not None})
                out, lse = reference._run(dataclasses.replace(rp, return_lse=True), upcast=False, dropout_mask=keep)
                return (out, lse) if dlse is not None else (out,)

            _, vjp = torch.func.vjp(attend, *xs)
            return vjp(tuple(cot))

        ins = [slots[i] for i in live] + [t for t in (dout, dlse) if t is not None]
        _, vjp2 = torch.func.vjp(first, *ins)
        gg = tuple(grad_grads[i] if grad_grads[i] is not None else torch.zeros_like(slots[i]) for i in live)
        seconds = vjp2(gg)
        gx = [None] * len(slots)
        for i, g in zip(live, seconds):
            gx[i] = g
        rest = iter(seconds[len(live):])
        gc = [None if t is None else next(rest) for t in (dout, dlse)]
        return (None, None, None, None, None, gx[0], gx[1], gx[2], gc[0], gc[1], *gx[3:])

    vmap = staticmethod(refuse_vmap("fused"))
