"""Peak memory of a T5 forward + backward with posattn's fused T5 bias (DistanceBias.t5
in the kernels) against the dense position_bias route and eager attention.

    python bench/t5_memory.py [--n 2048] [--layers 6] [--d-model 512]   (no GPU: TRITON_INTERPRET=1)

On a GPU it reads torch.cuda.max_memory_allocated. Without one (``--device meta``,
the default there) the model runs on the meta device (shapes only: the kernels are
not launched) and a dispatch mode counts the bytes of live tensors produced by every
operator (a storage counted once, until freed): what autograd keeps and the operators
return, which is where the dense [1, H, N, N] biases, scores and their gradients
live. The Triton kernels' own workspaces (O(N)) are not seen by it.
"""
import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensors created while active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        s = t.untyped_storage()
        key = s._cdata
        if key in self.seen or s.nbytes() == 0:
            return
        self.seen.add(key)
        n = s.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def free(key=key, n=n):
            self.live -= n
            self.seen.discard(key)
        weakref.finalize(s, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        return out


def run(impl, n, layers, d_model, device):
    import transformers
    config = transformers.T5Config(vocab_size=256, d_model=d_model, d_kv=d_model // 8, d_ff=4 * d_model,
                                   num_layers=layers,
                                   num_decoder_layers=layers, num_heads=8, relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation=impl).to(device).train()
    ids = torch.randint(0, 256, (1, n), device=device)
    labels = torch.randint(0, 256, (1, n), device=device)
    t0 = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as mode:
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        peak = mode.peak
    return peak, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6, help="per stack (t5-small: 6)")
    ap.add_argument("--d-model", type=int, default=512, help="t5-small: 512 (8 heads of 64)")
    ap.add_argument("--device", choices=("cuda", "cpu", "meta"), default=None)
    args = ap.parse_args()
    from posattn.integrations import hf
    fused = hf.register()
    dense = hf.register("posattn_dense", fused_encodings=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "meta")
    if device == "meta":
        # The Triton backend's host code on meta tensors: every tensor it allocates and
        # returns, kernels not launched (posattn/_op.py: fake inputs). Its refusal of the
        # meta device (no kernel can run there) is lifted for this count only.
        from posattn import _triton, interface
        assert _triton.interpreting(), "--device meta counts the Triton path: set TRITON_INTERPRET=1"
        interface._REFUSALS["triton"] = lambda p: None
    print(f"T5 d_model={args.d_model}, 8 heads, {args.layers}+{args.layers} layers, N={args.n} encoder and "
          f"decoder tokens, float32, {device}")
    for label, impl in (("posattn, fused DistanceBias.t5", fused), ("posattn, dense position_bias", dense),
                        ("eager", "eager")):
        peak, secs = run(impl, args.n, args.layers, args.d_model, device)
        print(f"{label:34s} peak {peak / 2**20:9.1f} MiB   ({secs:.0f} s)")


if __name__ == "__main__":
    main()
