"""Context parallelism (posattn.distributed): gloo on CPU, 2 and 4 processes spawned
here. Each rank's output and q / k / v gradients equal the matching shard of
single-process attention over the whole sequence (loss: the sum of every rank's local
loss), and the encodings' parameter gradients summed over the ranks equal the
single-process ones; both layouts; the Triton kernels (interpreter) and the reference."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import posattn
from posattn.distributed import context_parallel_attention, shard_positions

B, HQ, HKV, D = 1, 2, 1, 16
N_LOCAL = 8


def _cases(device="cpu"):
    """name -> (keywords builder given fresh parameter tensors, parameter names)."""
    def alibi():
        s = (posattn.alibi_slopes(HQ) * 1.3).requires_grad_()
        return dict(alibi_slopes=s), {"alibi_slopes": s}

    def table():
        t = torch.randn(HQ, 9, generator=torch.Generator().manual_seed(5)).requires_grad_()
        return dict(rel_bias=posattn.DistanceBias(t, 4, 4), window=(6, 3)), {"table": t}

    return {
        "causal+rope": lambda: (dict(causal=True, rope=posattn.RoPE(base=100.0)), {}),
        "alibi": alibi,
        "table+window": table,
        "causal+rope/reference": lambda: (dict(causal=True, rope=posattn.RoPE(base=100.0), backend="reference"), {}),
    }


def _global_inputs(world):
    g = torch.Generator().manual_seed(0)
    N = world * N_LOCAL
    q, k, v, dout = (torch.randn(B, h, N, D, generator=g) for h in (HQ, HKV, HKV, HQ))
    return q, k, v, dout


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v, dout = _global_inputs(world)
        results = {}
        for layout in ("contiguous", "zigzag"):
            idx = shard_positions(rank, world, N_LOCAL, layout)
            for name, build in _cases().items():
                kw, params = build()
                ql, kl, vl = (x[:, :, idx].clone().requires_grad_() for x in (q, k, v))
                out = context_parallel_attention(ql, kl, vl, layout=layout, **kw)
                (out * dout[:, :, idx]).sum().backward()
                results[(layout, name)] = dict(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad,
                                               **{"d" + n: p.grad for n, p in params.items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    q, k, v, dout = _global_inputs(world)
    for (layout, name), build in ((key, _cases()[key[1]]) for key in ranks[0]):
        kw, params = build()
        Q, K, V = (x.clone().requires_grad_() for x in (q, k, v))
        out = posattn.attention(Q, K, V, **kw)
        (out * dout).sum().backward()
        want = dict(out=out.detach(), dq=Q.grad, dk=K.grad, dv=V.grad, **{"d" + n: p.grad for n, p in params.items()})
        for r in range(world):
            idx = shard_positions(r, world, N_LOCAL, layout)
            got = ranks[r][(layout, name)]
            for t in ("out", "dq", "dk", "dv"):
                torch.testing.assert_close(got[t], want[t][:, :, idx], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{layout} {name} rank {r} {t}: {m}")
        for pname in params:   # replicated parameters: the ranks' contributions sum to the whole gradient
            total = sum(ranks[r][(layout, name)]["d" + pname] for r in range(world))
            torch.testing.assert_close(total, want["d" + pname], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{layout} {name} d{pname}: {m}")


def test_shard_positions_and_errors():
    assert shard_positions(1, 4, 4, "zigzag").tolist() == [2, 3, 12, 13]
    assert shard_positions(1, 2, 4).tolist() == [4, 5, 6, 7]
    assert sorted(torch.cat([shard_positions(r, 3, 4, "zigzag") for r in range(3)]).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="even"):
        shard_positions(0, 2, 5, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        shard_positions(0, 2, 4, "striped")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="bias"):
        context_parallel_attention(q, q, q, bias=torch.zeros(4, 4))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            context_parallel_attention(q, q, q)
