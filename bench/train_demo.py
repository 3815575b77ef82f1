"""What positions buy: train a tiny Transformer LM with each positional encoding.

Every model: 2 pre-LayerNorm blocks, d_model 64, 4 heads of 16, MLP 256, built
on posattn.nn.MultiheadAttention (causal), trained at length 64 for the same
number of steps on the same batches (same seed), then evaluated at lengths 64,
128, 256 and 512 on the same fresh sequences. Encodings: none; sinusoidal and
learned absolute (added to the token embeddings at the same scale; the learned
table has max_len = 64, so it has no rows for longer inputs: "n/a", by design);
RoPE (all 16 channels, base 10000); ALiBi (the standard slopes, fixed); T5 bias
(decoder style: unidirectional, 32 buckets, max_distance 128, one table shared
by both layers as in T5); Shaw relative embeddings (clip 16, key and value
tables per layer). All use the default scale 1/sqrt(16).

Tasks (``--task``):

- ``lag`` (default): random tokens from a vocabulary of 32; at every position
  ``t >= lag`` predict the token at ``t - lag`` (``--lag``, default 1: the
  previous-token head, the building block of induction heads). The content says
  nothing about which token is ``lag`` back: only positions do. Note that a
  causal model with no encoding still gets some order from the causal mask
  itself (Haviv et al. 2022); the "none" row shows how much.
- ``recall``: multi-query associative recall (Arora et al. 2023, "Zoology") as
  a causal LM: ``k1 v1 k2 v2 ...``, 16 keys, each with one of 16 values fixed
  per sequence; at each repeated key predict its value. It needs a
  previous-token head and an induction head, and the models learn it by a
  sudden phase change whose timing varies by encoding and seed: on the CPU
  budget of ``make demo`` some encodings pass it and some do not yet (measured:
  at 1000 steps x batch 16 ALiBi and Shaw did, RoPE did not, while at batch 32
  RoPE did by step 750), so its table measures training speed as much as the
  encodings. Give it more steps (a GPU) before reading anything into it.

Device: CUDA if present (posattn's automatic backend: the Triton kernels),
else the CPU with backend="reference" (even under TRITON_INTERPRET=1, which
``make`` sets without a GPU: the interpreter would take hours) and one thread
(``--threads``; the tensors are tiny). float32 throughout. Seeded: the same
command gives the same table on the same machine and thread count.

    python bench/train_demo.py [--task lag|recall] [--lag S] [--steps N] [--batch B]
                               [--encodings none,rope,...] [--seed S] [--plot PATH]

Prints the device and backend, a progress bar per encoding, then a table of
accuracy by evaluation length and encoding and, when matplotlib is importable,
saves a plot (default bench/results/train_demo.png).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time

import torch
from torch import nn

import posattn
from posattn import nn as pnn

N_KEYS, N_VALUES = 16, 16
VOCAB = N_KEYS + N_VALUES            # keys 0..15, values 16..31
TRAIN_LEN = 64
EVAL_LENS = (64, 128, 256, 512)
D_MODEL, HEADS, LAYERS = 64, 4, 2
DEFAULT_STEPS = 600
ENCODINGS = ("none", "sinusoidal", "learned", "rope", "alibi", "t5", "shaw")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

def recall_batch(batch: int, length: int, g: torch.Generator):
    """Associative recall: tokens [B, L], targets [B, L] (-100 where not scored)."""
    pairs = length // 2
    keys = torch.randint(0, N_KEYS, (batch, pairs), generator=g)
    table = torch.randint(0, N_VALUES, (batch, N_KEYS), generator=g)     # each sequence's key -> value
    values = N_KEYS + table.gather(1, keys)
    tokens = torch.stack([keys, values], dim=2).view(batch, 2 * pairs)
    # a key is a query when the same key occurred earlier in the sequence
    onehot = torch.nn.functional.one_hot(keys, N_KEYS)
    seen = (onehot.cumsum(1) - onehot).gather(2, keys[..., None])[..., 0] > 0
    targets = torch.full_like(tokens, -100)
    targets[:, 0::2] = torch.where(seen, values, torch.full_like(values, -100))   # predict v at k's position
    return tokens, targets


def lag_batch(batch: int, length: int, g: torch.Generator, lag: int = 1):
    """Lagged copy: random tokens; the target at position t >= lag is the token at t - lag."""
    tokens = torch.randint(0, VOCAB, (batch, length), generator=g)
    targets = torch.full_like(tokens, -100)
    targets[:, lag:] = tokens[:, :-lag]
    return tokens, targets


TASKS = {"lag": lag_batch, "recall": recall_batch}


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, positional, backend):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = pnn.MultiheadAttention(D_MODEL, HEADS, causal=True, positional=positional, backend=backend)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, encoding: str, backend):
        super().__init__()
        self.encoding = encoding
        self.embed = nn.Embedding(VOCAB, D_MODEL)                           # N(0, 1): rms 1 per channel
        self.absolute = None
        if encoding == "sinusoidal":
            self.absolute = pnn.SinusoidalPositionalEncoding(D_MODEL)         # rms 1/sqrt(2), any length
        elif encoding == "learned":
            self.absolute = pnn.LearnedPositionalEncoding(TRAIN_LEN, D_MODEL)
            nn.init.normal_(self.absolute.weight, std=1 / math.sqrt(2))      # the sinusoid's scale
        head_dim = D_MODEL // HEADS
        shared_t5 = pnn.T5RelativeBias(HEADS, num_buckets=32, max_distance=128, bidirectional=False) \
            if encoding == "t5" else None

        def positional():
            if encoding == "rope":
                return pnn.RotaryEmbedding(head_dim)
            if encoding == "alibi":
                return pnn.ALiBi(HEADS)
            if encoding == "t5":
                return shared_t5
            if encoding == "shaw":
                return pnn.ShawRelativeEmbeddings(HEADS, head_dim, clip=16)
            return None

        self.blocks = nn.ModuleList(Block(positional(), backend) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.absolute is not None:
            x = self.absolute(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (a line per quarter when it is not a terminal)."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last_quarter = -1

    def update(self, done: int, note: str = ""):
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            fill = int(self.width * done / self.total)
            eta = elapsed / done * (self.total - done) if done else 0.0
            sys.stderr.write(f"\r  {self.label:<11}[{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} "
                             f"{elapsed:5.1f}s eta {eta:4.0f}s {note}   ")
            sys.stderr.flush()
        else:
            quarter = 4 * done // self.total
            if quarter != self.last_quarter:
                self.last_quarter = quarter
                sys.stderr.write(f"  {self.label:<11}{done}/{self.total} {elapsed:5.1f}s {note}\n")

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, task, steps, batch, lr, seed, device):
    g = torch.Generator().manual_seed(seed)                 # the same batches for every encoding
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    bar = Progress(steps, model.encoding)
    model.train()
    avg = None
    for step in range(steps):
        tokens, targets = task(batch, TRAIN_LEN, g)
        tokens, targets = tokens.to(device), targets.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=steps // 20)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.update(step + 1, f"loss {avg:.3f}")
    bar.close()
    return avg


@torch.no_grad()
def evaluate(model, task, length, n_seqs, seed, device):
    """Accuracy over the scored positions of n_seqs fresh sequences of this length."""
    if model.encoding == "learned" and length > TRAIN_LEN:
        return None                                    # no embedding for positions >= max_len
    model.eval()
    g = torch.Generator().manual_seed(seed + length)   # the same sequences for every encoding
    correct = total = 0
    chunk = max(1, 16 * 512 // length)
    for start in range(0, n_seqs, chunk):
        tokens, targets = task(min(chunk, n_seqs - start), length, g)
        tokens, targets = tokens.to(device), targets.to(device)
        pred = model(tokens).argmax(-1)
        scored = targets != -100
        correct += (pred[scored] == targets[scored]).sum().item()
        total += scored.sum().item()
    return correct / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per encoding")
    ap.add_argument("--task", choices=sorted(TASKS), default="lag")
    ap.add_argument("--lag", type=int, default=1, help="the lag of --task lag")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-seqs", type=int, default=64, help="evaluation sequences per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only)")
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "train_demo.png"))
    args = ap.parse_args(argv)
    encodings = [e for e in args.encodings.split(",") if e]
    unknown = set(encodings) - set(ENCODINGS)
    if unknown:
        ap.error(f"unknown encodings {sorted(unknown)}; choose from {ENCODINGS}")
    if args.task == "lag":
        if not 1 <= args.lag < TRAIN_LEN:
            ap.error(f"--lag must be in 1..{TRAIN_LEN - 1}")
        task = functools.partial(lag_batch, lag=args.lag)
        what = f"lagged copy: predict the token {args.lag} position(s) back, {VOCAB} random tokens"
        chance = 1 / VOCAB
    else:
        task = recall_batch
        what = f"associative recall, {N_KEYS} keys -> {N_VALUES} values per sequence"
        chance = 1 / N_VALUES

    if torch.cuda.is_available():
        device, backend = torch.device("cuda"), None
    else:
        device, backend = torch.device("cpu"), "reference"
        # The tensors are tiny: one thread is about 4x faster per step than two here
        # (measured on the 2-core CI machine; thread hand-offs cost more than they give).
        torch.set_num_threads(args.threads)
    probe = torch.zeros(1, HEADS, 8, D_MODEL // HEADS, device=device)
    used = posattn.select_backend(probe, probe, probe, backend=backend, causal=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"posattn {posattn.__version__}, torch {torch.__version__}; device {device} ({where}); "
          f"backend {used!r}; float32")
    print(f"task: {what} (chance {chance:.3f})")
    print(f"model: {LAYERS} layers, d_model {D_MODEL}, {HEADS} heads; train length {TRAIN_LEN}, {args.steps} "
          f"steps x batch {args.batch}, AdamW lr {args.lr}; eval {args.eval_seqs} sequences per length; "
          f"seed {args.seed}")

    t_start, c_start = time.perf_counter(), time.process_time()
    results, notes = {}, {}
    for enc in encodings:
        torch.manual_seed(args.seed)                    # the same initial weights where shapes agree
        model = TinyLM(enc, backend).to(device)
        t0 = time.perf_counter()
        loss = train(model, task, args.steps, args.batch, args.lr, args.seed, device)
        t_train = time.perf_counter() - t0
        results[enc] = {n: evaluate(model, task, n, args.eval_seqs, args.seed + 1, device) for n in EVAL_LENS}
        notes[enc] = (loss, t_train, time.perf_counter() - t0 - t_train)

    print()
    print(f"accuracy on the scored positions (chance {chance:.3f}); trained at length {TRAIN_LEN}")
    head = f"| {'encoding':<11}| " + " | ".join(f"{'L=' + str(n):>6}" for n in EVAL_LENS) + \
        " | train loss | train s | eval s |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for enc in encodings:
        cells = " | ".join(f"{'n/a':>6}" if results[enc][n] is None else f"{results[enc][n]:6.3f}"
                           for n in EVAL_LENS)
        loss, tt, te = notes[enc]
        print(f"| {enc:<11}| {cells} | {loss:10.3f} | {tt:7.1f} | {te:6.1f} |")
    if "learned" in encodings:
        print(f"\nn/a: the learned absolute table has max_len = {TRAIN_LEN} rows; longer inputs are an error "
              f"by design.")
    print(f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time() - c_start:.0f} s CPU")
    plot(results, encodings, chance, args.plot)


def plot(results, encodings, chance, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot (the table above has the numbers)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for enc in encodings:
        xs = [n for n in EVAL_LENS if results[enc][n] is not None]
        ax.plot(xs, [results[enc][n] for n in xs], marker="o", label=enc)
    ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.axvline(TRAIN_LEN, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(EVAL_LENS, [str(n) for n in EVAL_LENS])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("evaluation length (trained at 64)")
    ax.set_ylabel("accuracy")
    ax.set_title("posattn: what positions buy")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
