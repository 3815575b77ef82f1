"""Context-parallel attention on every GPU of this machine (NCCL): one sequence of
W * n tokens split over W ranks, forward + backward through
posattn.distributed.context_parallel_attention; prints each rank's time and
throughput (FlashAttention's FLOP count for the rank's queries against the keys it
attends to: 4 * B * H * n * Nk * D forward, x 3.5 for forward + backward, halved
when causal as in bench/run.py).

    python bench/context_parallel.py [--n 8192] [--d 128] [--heads 16] [--layout zigzag] [--causal]

Spawns one process per GPU itself (or runs under torchrun when RANK is set). No GPU:
says so and exits 0 (the test suite checks the same code on CPU with gloo).
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from posattn.distributed import context_parallel_attention  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--d", type=int, default=128, help="head dim")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    return ap.parse_args(argv)


def run(rank, world, args, init):
    torch.cuda.set_device(rank)
    if init is not None:
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    else:
        dist.init_process_group("nccl")
    try:
        dev = torch.device("cuda", rank)
        g = torch.Generator(device=dev).manual_seed(rank)
        shape = (args.batch, args.heads, args.n, args.d)
        q, k, v = (torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))

        def step():
            out = context_parallel_attention(q, k, v, layout=args.layout, causal=args.causal)
            out.backward(torch.ones_like(out))

        step()                                   # compile, warm up
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.reps * 1e3
        keys = world * args.n
        flops = 4.0 * args.batch * args.heads * args.n * keys * args.d * 3.5 / (2 if args.causal else 1)
        print(f"rank {rank}/{world} {torch.cuda.get_device_name(dev)}: n={args.n} (sequence {keys}) "
              f"D={args.d} H={args.heads} {args.layout}{' causal' if args.causal else ''}: "
              f"{ms:.2f} ms fwd+bwd, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse(argv)
    if "RANK" in os.environ:   # torchrun
        run(int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    world = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world == 0:
        print("context_parallel.py: no CUDA GPU here, nothing to measure (tests/test_distributed.py runs "
              "the same code with gloo on CPU)")
        return 0
    init = f"file://{os.path.abspath(f'.cp_init_{os.getpid()}')}"
    try:
        mp.spawn(run, args=(world, args, init), nprocs=world, join=True)
    finally:
        path = init[len("file://"):]
        if os.path.exists(path):
            os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
