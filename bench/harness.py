"""Pure pieces of the benchmark: protocol, FLOP counts, row ids and filters,
ratio and memory tables, result files and the plot.

Nothing here imports torch or needs a device, so all of it is unit-tested on CPU
(bench/test_harness.py). bench/run.py does the measuring and calls these.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

KIB = 1024
MIB = 1024 * 1024

ENCODINGS = ("none", "rope", "alibi", "distance", "softcap", "dropout", "decode")
SOFTCAP = 50.0      # Gemma 2's attention logit cap
DROPOUT_P = 0.1
MODES = ("fwd", "fwd+bwd")
POSATTN = "posattn"


def is_posattn(method: str) -> bool:
    """posattn itself or one of its own variants ("posattn-..."): not a peer."""
    return method == POSATTN or method.startswith(POSATTN + "-")

# Methods compared in each encoding, posattn first (the ratios are against it).
# "reference" (posattn.reference, dense float terms) is added on CPU only.
METHODS = {
    "none": (POSATTN, "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex"),
    "rope": (POSATTN, "torch-rope+sdpa-cudnn", "torch-rope+sdpa-flash", "torch-rope+sdpa-efficient"),
    # posattn-alibi-fma: posattn with the column term as an add per score (A/B of _triton.ALIBI_COLUMN_MMA)
    "alibi": (POSATTN, "posattn-alibi-fma", "flex", "dense-bias+sdpa-efficient"),
    "distance": (POSATTN, "flex", "dense-bias+sdpa-efficient"),
    "softcap": (POSATTN, "flex"),                                   # cap * tanh(score / cap)
    "dropout": (POSATTN, "sdpa-flash", "sdpa-efficient"),           # dropout_p = DROPOUT_P
    # one query per row against N keys, DECODE_GROUP query heads per k/v head (KV-cache decoding)
    "decode": (POSATTN, "sdpa-flash", "flex"),           # (SDPA's efficient backend refuses enable_gqa)
}
DECODE_GROUP = 4
# Encodings measured with one mask and one mode only: decoding is forward, full (one
# query at the end of the cache sees every key).
FORWARD_FULL_ONLY = ("decode",)


# --------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------

@dataclass
class Protocol:
    """What is measured. The defaults are the FlashAttention-3 paper's protocol."""
    name: str = "full"
    dtype: str = "bfloat16"
    tokens: int = 16 * 1024          # B * N
    hidden: int = 2048               # H * D
    head_dims: Tuple[int, ...] = (64, 128)
    seqlens: Tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    # Explicit (D, N) pairs measured, in this order, instead of head_dims x seqlens
    # (the quick protocol: both head dims and both ends of N without the cross product).
    pairs: Tuple[Tuple[int, int], ...] = ()
    causal: Tuple[bool, ...] = (False, True)
    # Encodings measured with the causal mask only (the quick protocol: the full mask is
    # kept for "none" alone).
    causal_only: Tuple[str, ...] = ()
    modes: Tuple[str, ...] = MODES
    encodings: Tuple[str, ...] = ENCODINGS
    extra_methods: Tuple[str, ...] = ()    # appended to every encoding's methods ("reference" on CPU)
    distance_left: int = 128         # DistanceBias(table [H, L + R + 1], L, R): T5-sized
    distance_right: int = 128
    rope_base: float = 10000.0
    timer: str = "triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[...], return_mode='median')"
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_reps: int = 2                # CPU smoke: timed calls per row (median of wall clock)
    matmul_n: int = 8192             # reference matmul: matmul_n^3, in `dtype`
    seed: int = 0
    notes: Tuple[str, ...] = ()

    def shape(self, n: int, d: int) -> Tuple[int, int]:
        """(B, H) for sequence length n and head dim d: B * n = tokens, H * d = hidden."""
        return shape_for(self.tokens, self.hidden, n, d)

    def methods(self, encoding: str) -> Tuple[str, ...]:
        return tuple(METHODS[encoding]) + tuple(m for m in self.extra_methods if m not in METHODS[encoding])

    def dn_pairs(self) -> List[Tuple[int, int]]:
        """The (D, N) shapes measured, in plan order: ``pairs`` when given, else
        head_dims x seqlens."""
        if self.pairs:
            return [(int(d), int(n)) for d, n in self.pairs]
        return [(d, n) for d in self.head_dims for n in self.seqlens]

    def masks(self, encoding: str) -> Tuple[bool, ...]:
        """The causal values measured for an encoding."""
        if encoding in FORWARD_FULL_ONLY:
            return tuple(c for c in self.causal if not c)
        if encoding in self.causal_only:
            return tuple(c for c in self.causal if c)
        return tuple(self.causal)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["flops"] = FLOP_RULE
        d["methods"] = {e: list(self.methods(e)) for e in self.encodings}
        d["shapes"] = {f"D{dd}/N{n}": dict(zip(("B", "H"), self.shape(n, dd))) for dd, n in self.dn_pairs()}
        return d


FLOP_RULE = ("forward = 4 * B * H * Nq * Nk * D (halved when causal); backward = 2.5 x forward, "
             "so fwd+bwd = 3.5 x forward; encodings add no FLOPs to the count")

PROTOCOL_NOTES = (
    "Same inputs (fresh torch.randn per group of D, N, mask, encoding, mode) for every method of a group.",
    "Timing: median of triton.testing.do_bench (L2 flushed before each call); the first call "
    "(compilation, autotuning) and do_bench's own warm-up are excluded.",
    "Peak memory: torch.cuda.max_memory_allocated() over one call after reset_peak_memory_stats(), "
    "inputs included.",
    "fwd runs under torch.no_grad(); fwd+bwd is out = f(...); out.backward(dout) with the gradients of q, k, v "
    "and of the DistanceBias table (ALiBi slopes are fixed, no gradient) reset to None before each call.",
    "torch-rope+sdpa: HF-style rotate_half RoPE in PyTorch ops on q and k (cos/sin tables precomputed, "
    "outside the timing), then SDPA with the named backend forced (sdpa_kernel).",
    "dense-bias+sdpa-efficient: the [H, N, N] bias is built inside the timed call (ALiBi: slopes * -|i - j| "
    "from a precomputed bf16 distance matrix; distance table: table[:, idx] with a precomputed int32 index "
    "matrix), plus a precomputed additive causal mask when causal, expanded (a view) to [B, H, N, N], then "
    "SDPA with EFFICIENT_ATTENTION forced; its gradient reaches the table through the gather.",
    "flex: torch.compile(flex_attention, dynamic=False); causal via create_block_mask (built outside the "
    "timing); ALiBi score_mod: score - slope[h] * |q_idx - kv_idx|; distance score_mod: "
    "score + table[h, clamp(kv_idx - q_idx, -L, R) + L], the table captured with its gradient.",
    "max abs diff (max_abs_diff): the max abs difference of each method's forward output from posattn's "
    "on the same inputs.",
    "decode: one query per row (q [B, H, 1, D]) against k / v [B, H / 4, N, D] (GQA), forward only, no mask "
    "(the query is the cache's last position); FLOPs 4 * B * H * N * D; SDPA flash and flex with enable_gqa=True.",
)


def shape_for(tokens: int, hidden: int, n: int, d: int) -> Tuple[int, int]:
    if n <= 0 or d <= 0 or tokens % n or hidden % d:
        raise ValueError(f"tokens={tokens} must be a multiple of N={n} and hidden={hidden} of D={d}")
    return tokens // n, hidden // d


def full_protocol() -> Protocol:
    return Protocol(notes=PROTOCOL_NOTES)


QUICK_NOTES = (
    "Quick protocol: two (D, N) shapes, (128, 8192) then (64, 1024), instead of the 2 x 6 grid; "
    "encoding 'none' with the full and the causal mask, RoPE / ALiBi / DistanceBias / softcap / dropout causal only, "
    "decode forward only. "
    "About 3 minutes on an H200, mostly compilation (FlexAttention compiles once per shape, mask, "
    "encoding and mode; posattn once per head dim, mask and encoding).",
)


def quick_protocol() -> Protocol:
    """A fast GPU run (about 3 minutes, see QUICK_NOTES): both head dims, N from 1k to 8k,
    every method and encoding, forward and forward+backward, 106 rows in 30 groups."""
    return Protocol(name="quick", head_dims=(128, 64), seqlens=(8192, 1024), pairs=((128, 8192), (64, 1024)),
                    causal_only=("rope", "alibi", "distance", "softcap", "dropout"), notes=QUICK_NOTES + PROTOCOL_NOTES)


def smoke_protocol() -> Protocol:
    """The CPU smoke run: a tiny problem to exercise the code paths, numbers meaningless."""
    return Protocol(name="cpu-smoke", tokens=128, hidden=128, head_dims=(64,), seqlens=(128,),
                    extra_methods=("reference",), matmul_n=512, distance_left=16, distance_right=16,
                    timer="median of Protocol.cpu_reps wall-clock calls after one warm-up call (CPU)",
                    notes=("CPU smoke run: tiny shapes, interpreter or CPU kernels; the numbers mean nothing.",)
                    + PROTOCOL_NOTES)


# --------------------------------------------------------------------------
# FLOPs and rates
# --------------------------------------------------------------------------

def attn_flops(B: int, H: int, Nq: int, Nk: int, D: int, causal: bool, mode: str) -> float:
    """FlashAttention-3 paper's count: 4*B*H*Nq*Nk*D forward, halved when causal; fwd+bwd = 3.5x fwd."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    f = 4.0 * B * H * Nq * Nk * D
    if causal:
        f /= 2
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def matmul_flops(n: int) -> float:
    return 2.0 * n ** 3


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or not ms > 0 or not math.isfinite(ms):
        return None
    return flops / (ms * 1e-3) / 1e12


def fraction(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b > 0:
        return None
    return a / b


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no values")
    return float(statistics.median(xs))


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------

def group_id(d: int, n: int, causal: bool, encoding: str, mode: str) -> str:
    return f"D{d}/N{n}/{'causal' if causal else 'full'}/{encoding}/{mode}"


def row_id(d: int, n: int, causal: bool, encoding: str, mode: str, method: str) -> str:
    """'D128/N4096/causal/alibi/fwd+bwd/flex'. --only matches substrings of it."""
    return f"{group_id(d, n, causal, encoding, mode)}/{method}"


def matches(rid: str, only: Optional[Sequence[str]]) -> bool:
    """True when every --only text is a substring of the row id (no filter: all)."""
    return all(s in rid for s in (only or ()))


@dataclass
class Planned:
    D: int
    N: int
    B: int
    H: int
    causal: bool
    encoding: str
    mode: str
    method: str

    @property
    def id(self) -> str:
        return row_id(self.D, self.N, self.causal, self.encoding, self.mode, self.method)

    @property
    def group(self) -> str:
        return group_id(self.D, self.N, self.causal, self.encoding, self.mode)


def plan(protocol: Protocol, only: Optional[Sequence[str]] = None) -> List[Planned]:
    """Every row to measure, in order: by (D, N) (protocol.dn_pairs()), mask, encoding, mode,
    then method (posattn first)."""
    out = []
    for d, n in protocol.dn_pairs():
        b, h = protocol.shape(n, d)
        for causal in protocol.causal:
            for enc in protocol.encodings:
                if causal not in protocol.masks(enc):
                    continue
                for mode in protocol.modes:
                    if enc in FORWARD_FULL_ONLY and mode != "fwd":
                        continue
                    for m in protocol.methods(enc):
                        p = Planned(d, n, b, h, causal, enc, mode, m)
                        if matches(p.id, only):
                            out.append(p)
    return out


def groups(planned: Iterable[Planned]) -> List[List[Planned]]:
    """Consecutive rows of one group (same inputs) together, in plan order."""
    out: List[List[Planned]] = []
    for p in planned:
        if out and out[-1][0].group == p.group:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def make_row(p: Planned, *, status: str, ms: Optional[float] = None, backend: str = "",
             note: str = "", peak_bytes: Optional[int] = None, base_bytes: Optional[int] = None,
             max_abs_diff: Optional[float] = None, matmul_tflops: Optional[float] = None) -> dict:
    """One result row (a plain dict: it goes to JSON as is)."""
    if status not in ("ok", "error", "skipped"):
        raise ValueError(f"status must be ok, error or skipped, got {status!r}")
    flops = attn_flops(p.B, p.H, 1 if p.encoding == "decode" else p.N, p.N, p.D, p.causal, p.mode)
    rate = tflops(flops, ms) if status == "ok" else None
    return {
        "id": p.id, "group": p.group, "D": p.D, "N": p.N, "B": p.B, "H": p.H, "causal": p.causal,
        "encoding": p.encoding, "mode": p.mode, "method": p.method, "backend": backend,
        "status": status, "note": note,
        "ms": ms if status == "ok" else None,
        "flops": flops, "tflops": rate,
        "frac_matmul": fraction(rate, matmul_tflops),
        "peak_mib": None if peak_bytes is None else peak_bytes / MIB,
        "base_mib": None if base_bytes is None else base_bytes / MIB,
        "max_abs_diff": max_abs_diff,
    }


def error_note(exc: BaseException, extra: str = "") -> str:
    """'<Type>: <first line of the message>' (+ ' [extra]'), for a failed row."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    note = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(note) > 300:
        note = note[:297] + "..."
    return f"{note} [{extra}]" if extra else note


# --------------------------------------------------------------------------
# Ratios, summary, memory
# --------------------------------------------------------------------------

def _ok_ms(row: Optional[dict]) -> Optional[float]:
    if row is None or row.get("status") != "ok" or row.get("ms") is None:
        return None
    return row["ms"]


def add_ratios(rows: List[dict]) -> List[dict]:
    """Annotate each row with ``vs_posattn`` = row ms / posattn ms in its group (> 1: the row is
    slower than posattn, i.e. posattn's speedup over it); None when either did not run."""
    by_group: Dict[str, dict] = {r["group"]: r for r in rows if r["method"] == POSATTN}
    for r in rows:
        base = _ok_ms(by_group.get(r["group"]))
        mine = _ok_ms(r)
        r["vs_posattn"] = mine / base if (base and mine is not None) else None
    return rows


def summary(rows: List[dict]) -> List[dict]:
    """One entry per group: posattn's ms and TFLOP/s, its speedup over each peer and over
    its own variants (their ms / posattn ms, None when either failed) and over the best
    peer that ran (variants are not peers)."""
    out = []
    order: List[str] = []
    members: Dict[str, List[dict]] = {}
    for r in rows:
        if r["group"] not in members:
            order.append(r["group"])
            members[r["group"]] = []
        members[r["group"]].append(r)
    for g in order:
        rs = members[g]
        first = rs[0]
        pa = next((r for r in rs if r["method"] == POSATTN), None)
        base = _ok_ms(pa)
        speedups = {}
        best = None
        for r in rs:
            if r["method"] in (POSATTN, "reference"):
                continue
            ms = _ok_ms(r)
            speedups[r["method"]] = ms / base if (ms is not None and base) else None
            if ms is not None and not is_posattn(r["method"]) and (best is None or ms < best[1]):
                best = (r["method"], ms)
        out.append({
            "group": g, "D": first["D"], "N": first["N"], "causal": first["causal"],
            "encoding": first["encoding"], "mode": first["mode"],
            "posattn_ms": base, "posattn_tflops": pa["tflops"] if pa else None,
            "posattn_frac_matmul": pa["frac_matmul"] if pa else None,
            "speedup": speedups,
            "best_peer": best[0] if best else None,
            "speedup_vs_best": (best[1] / base) if (best and base) else None,
        })
    return out


def memory_table(rows: List[dict], n: Optional[int] = None) -> List[dict]:
    """At the largest N (or ``n``): peak memory of posattn with no bias and with DistanceBias,
    and of the dense-bias SDPA peer on the same DistanceBias problem, per D, mask and mode."""
    if not rows:
        return []
    n = n if n is not None else max(r["N"] for r in rows)
    out = []
    keys = []
    for r in rows:
        k = (r["D"], r["causal"], r["mode"])
        if r["N"] == n and k not in keys:
            keys.append(k)

    def find(d, causal, mode, enc, method):
        for r in rows:
            if (r["N"], r["D"], r["causal"], r["mode"], r["encoding"], r["method"]) == (n, d, causal, mode, enc,
                                                                                          method):
                return r
        return None

    def mib(r):
        if r is None:
            return None, "not run"
        if r["status"] != "ok":
            return None, r["note"] or r["status"]
        return r["peak_mib"], ""

    for d, causal, mode in keys:
        none_r = find(d, causal, mode, "none", POSATTN)
        dist_r = find(d, causal, mode, "distance", POSATTN)
        dense_r = find(d, causal, mode, "distance", "dense-bias+sdpa-efficient")
        (a, an), (b, bn), (c, cn) = mib(none_r), mib(dist_r), mib(dense_r)
        if none_r is None and dist_r is None and dense_r is None:
            continue
        out.append({"N": n, "D": d, "causal": causal, "mode": mode,
                    "posattn_none_mib": a, "posattn_distance_mib": b, "dense_bias_sdpa_mib": c,
                    "distance_over_none": fraction(b, a), "dense_over_posattn_distance": fraction(c, b),
                    "notes": "; ".join(x for x in (an and f"posattn/none: {an}", bn and f"posattn/distance: {bn}",
                                                   cn and f"dense-bias: {cn}") if x)})
    return out


def failures(rows: List[dict], method: Optional[str] = None) -> List[dict]:
    """Rows that failed: all, or those of ``method`` (POSATTN: posattn and its variants)."""
    return [r for r in rows if r["status"] == "error" and (
        method is None or r["method"] == method or method == POSATTN and is_posattn(r["method"]))]


# --------------------------------------------------------------------------
# Rendering and files
# --------------------------------------------------------------------------

def _f(x, fmt="{:.3g}", none="-"):
    if x is None:
        return none
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return fmt.format(x)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for cells in body:
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines)


ROW_HEADER = ("D", "N", "B", "H", "mask", "encoding", "mode", "method", "backend", "ms", "TFLOP/s",
              "% matmul", "peak MiB", "x posattn", "max abs diff", "status")


def row_cells(r: dict) -> List[str]:
    status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
    return [str(r["D"]), str(r["N"]), str(r["B"]), str(r["H"]), "causal" if r["causal"] else "full",
            r["encoding"], r["mode"], r["method"], r.get("backend", ""), _f(r["ms"], "{:.4g}"),
            _f(r["tflops"], "{:.1f}"), _f(None if r["frac_matmul"] is None else 100 * r["frac_matmul"], "{:.1f}"),
            _f(r["peak_mib"], "{:.0f}"), _f(r.get("vs_posattn"), "{:.3g}"), _f(r["max_abs_diff"], "{:.2g}"),
            status]


def format_console_row(r: dict) -> str:
    """One line per measured row for the terminal."""
    if r["status"] != "ok":
        return f"{r['id']:<52} {r['status'].upper()}: {r['note']}"
    return (f"{r['id']:<52} {_f(r['ms'], '{:9.4f}'):>9} ms {_f(r['tflops'], '{:7.1f}'):>7} TFLOP/s "
            f"{_f(None if r['frac_matmul'] is None else 100 * r['frac_matmul'], '{:5.1f}'):>5}% mm "
            f"peak {_f(r['peak_mib'], '{:.0f}'):>6} MiB  x posattn {_f(r.get('vs_posattn'), '{:.2f}'):>5}  "
            f"maxdiff {_f(r['max_abs_diff'], '{:.2g}')}  [{r.get('backend', '')}]")


def render_markdown(env: dict, protocol: dict, matmul: dict, rows: List[dict], *, smoke: bool = False) -> str:
    rows = add_ratios([dict(r) for r in rows])
    parts = []
    title = "posattn benchmark" + (" (CPU SMOKE RUN: THE NUMBERS MEAN NOTHING)" if smoke else "")
    parts.append(f"# {title}\n")
    if smoke:
        parts.append("> This was a CPU smoke run (tiny shapes, Triton interpreter or CPU kernels). It only "
                     "checks that the benchmark runs; none of its timings say anything about GPU performance.\n")
    parts.append(md_table(("field", "value"), [
        ("device", env.get("device", "?")), ("date (UTC)", env.get("date", "?")),
        ("git commit", env.get("commit", "?")), ("torch", env.get("torch", "?")),
        ("triton", env.get("triton", "?")), ("CUDA", str(env.get("cuda", "-"))),
        ("cuDNN", str(env.get("cudnn", "-"))), ("python", env.get("python", "?")),
        ("TRITON_INTERPRET", str(env.get("triton_interpret", "<unset>"))),
        ("protocol", protocol.get("name", "?")), ("command", env.get("command", "?")),
    ]))
    parts.append("")
    parts.append("## Protocol\n")
    pairs = [tuple(x) for x in protocol.get("pairs") or ()]
    shapes = (f"(D, N) in {pairs}" if pairs else
              f"D in {list(protocol.get('head_dims', []))}; N in {list(protocol.get('seqlens', []))}")
    parts.append(f"- dtype {protocol.get('dtype')}; B*N = {protocol.get('tokens')} tokens; H*D = "
                 f"{protocol.get('hidden')}; {shapes}; causal in {list(protocol.get('causal', []))}"
                 + (f" (causal only: {list(protocol['causal_only'])})" if protocol.get("causal_only") else "")
                 + f"; modes {list(protocol.get('modes', []))}.")
    parts.append(f"- FLOPs: {protocol.get('flops')}.")
    parts.append(f"- Timer: {protocol.get('timer')}.")
    parts.append(f"- DistanceBias: L = {protocol.get('distance_left')}, R = {protocol.get('distance_right')}; "
                 f"RoPE base {protocol.get('rope_base')}.")
    for note in protocol.get("notes", ()):
        parts.append(f"- {note}")
    mm = matmul or {}
    parts.append(f"- Reference matmul {mm.get('n', '?')}^3 {mm.get('dtype', '')}: "
                 f"{_f(mm.get('ms'), '{:.4g}')} ms, {_f(mm.get('tflops'), '{:.1f}')} TFLOP/s"
                 + (f" ({mm['note']})" if mm.get("note") else "") + "; '% matmul' is a row's TFLOP/s over it.")
    parts.append("")

    summ = summary(rows)
    parts.append("## Summary: posattn's speedup over each peer\n")
    parts.append("peer ms / posattn ms in the same group (same inputs): > 1 means posattn is faster. "
                 "'-' where either did not run (see the rows below).\n")
    for enc in ENCODINGS:
        es = [s for s in summ if s["encoding"] == enc]
        if not es:
            continue
        peers: List[str] = []
        for s in es:
            for p in s["speedup"]:
                if p not in peers:
                    peers.append(p)
        header = ["D", "N", "mask", "mode", "posattn ms", "posattn TFLOP/s", "% matmul"] + \
            [f"vs {p}" for p in peers] + ["vs best peer"]
        body = []
        for s in es:
            body.append([str(s["D"]), str(s["N"]), "causal" if s["causal"] else "full", s["mode"],
                         _f(s["posattn_ms"], "{:.4g}"), _f(s["posattn_tflops"], "{:.1f}"),
                         _f(None if s["posattn_frac_matmul"] is None else 100 * s["posattn_frac_matmul"],
                            "{:.1f}")]
                        + [_f(s["speedup"].get(p), "{:.3g}") for p in peers]
                        + [_f(s["speedup_vs_best"], "{:.3g}") + (f" ({s['best_peer']})" if s["best_peer"] else "")])
        parts.append(f"### {enc}\n")
        parts.append(md_table(header, body))
        parts.append("")

    mem = memory_table(rows)
    if mem:
        parts.append(f"## Memory at N = {mem[0]['N']}: DistanceBias vs no bias vs dense-bias SDPA\n")
        parts.append("Peak torch.cuda.max_memory_allocated over one call, inputs included (MiB).\n")
        parts.append(md_table(
            ("D", "mask", "mode", "posattn, no bias", "posattn, DistanceBias", "dense-bias SDPA (efficient)",
             "DistanceBias / no bias", "dense / posattn DistanceBias", "notes"),
            [[str(m["D"]), "causal" if m["causal"] else "full", m["mode"], _f(m["posattn_none_mib"], "{:.0f}"),
              _f(m["posattn_distance_mib"], "{:.0f}"), _f(m["dense_bias_sdpa_mib"], "{:.0f}"),
              _f(m["distance_over_none"], "{:.2f}"), _f(m["dense_over_posattn_distance"], "{:.1f}"), m["notes"]]
             for m in mem]))
        parts.append("")

    parts.append("## All rows\n")
    parts.append("'x posattn' = this row's ms / posattn's ms in its group (> 1: slower than posattn). "
                 "'max abs diff' = max abs difference of the forward output from posattn's.\n")
    parts.append(md_table(ROW_HEADER, [row_cells(r) for r in rows]))
    parts.append("")
    return "\n".join(parts)


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "unknown"


def result_stem(device_name: str, date: str, *, quick: bool = False, only: Optional[Sequence[str]] = None) -> str:
    """'<gpu-name-slug>_<YYYY-MM-DD>' plus '_quick' / '_only-<filters>' so partial runs do not
    overwrite the full one."""
    stem = f"{slug(device_name)}_{date}"
    if quick:
        stem += "_quick"
    if only:
        stem += "_only-" + slug("-".join(only))[:60]
    return stem


def utc_date(now: Optional[_dt.datetime] = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%d")


def git_commit(cwd: Optional[str] = None, override: Optional[str] = None,
               runner: Callable = subprocess.run) -> str:
    """The commit to record: ``override`` (--commit), else POSATTN_BENCH_COMMIT, else
    ``git rev-parse HEAD`` (+ '-dirty' when tracked files differ), else a fallback string."""
    if override:
        return override
    env = os.environ.get("POSATTN_BENCH_COMMIT")
    if env:
        return env
    try:
        res = runner(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=20)
        if res.returncode != 0 or not res.stdout.strip():
            raise RuntimeError(res.stderr.strip() or f"exit {res.returncode}")
        commit = res.stdout.strip()
    except Exception as e:  # git missing, not a repository (e.g. a copied working tree)
        return f"unknown (git rev-parse HEAD failed: {type(e).__name__}; set --commit or POSATTN_BENCH_COMMIT)"
    try:
        st = runner(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                    text=True, timeout=20)
        if st.returncode == 0 and st.stdout.strip():
            commit += "-dirty"
    except Exception:
        pass
    return commit


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str, stem: str, env: dict, protocol: dict, matmul: dict, rows: List[dict], *,
                  smoke: bool = False, complete: bool = True) -> Dict[str, str]:
    """Write <stem>.json and <stem>.md into out_dir (created); returns their paths.
    Called after every group so an interrupted run still leaves what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    rows = add_ratios([dict(r) for r in rows])
    doc = {
        "schema": "posattn-bench/1",
        "complete": complete,
        "smoke": smoke,
        "env": env,
        "protocol": protocol,
        "matmul": matmul,
        "rows": rows,
        "summary": summary(rows),
        "memory": memory_table(rows),
    }
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    _atomic_write(paths["json"], json.dumps(_sanitize(doc), indent=1, default=str, allow_nan=False))
    md = render_markdown(env, protocol, matmul, rows, smoke=smoke)
    if not complete:
        md = md.replace("\n## Protocol", "\n> Partial results: the run had not finished when this was "
                        "written.\n\n## Protocol", 1)
    _atomic_write(paths["md"], md)
    return paths


def _sanitize(o):
    """JSON-safe copy: tuples to lists, NaN / inf to strings (strict JSON has neither)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def load_results(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{path}: not a posattn benchmark result (no 'rows')")
    return doc


def split_resume(previous: List[dict], grouped: List[List[Planned]]) -> Tuple[List[dict], List[List[Planned]]]:
    """For --resume: (rows to keep, groups still to measure). A group is kept only when every
    one of its planned rows is in ``previous`` (a group cut short is measured again, whole, so
    that its methods share one set of inputs); rows not in the plan are dropped."""
    by_id = {r["id"]: r for r in previous}
    kept, todo = [], []
    for grp in grouped:
        if all(p.id in by_id for p in grp):
            kept.extend(by_id[p.id] for p in grp)
        else:
            todo.append(grp)
    return kept, todo


def order_rows(rows: List[dict], planned: List[Planned]) -> List[dict]:
    """Rows in plan order (rows not in the plan last, in their order)."""
    index = {p.id: i for i, p in enumerate(planned)}
    return sorted(rows, key=lambda r: index.get(r["id"], len(index)))


def is_complete(rows: List[dict], planned: List[Planned]) -> bool:
    have = {r["id"] for r in rows}
    return all(p.id in have for p in planned)


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------

def plot_series(rows: List[dict]) -> Dict[Tuple[int, str, bool, str], Dict[str, List[Tuple[int, float]]]]:
    """{(D, encoding, causal, mode): {method: [(N, TFLOP/s), ...] sorted by N}} over rows that ran."""
    out: Dict[Tuple[int, str, bool, str], Dict[str, List[Tuple[int, float]]]] = {}
    for r in rows:
        if r["status"] != "ok" or r["tflops"] is None:
            continue
        key = (r["D"], r["encoding"], r["causal"], r["mode"])
        out.setdefault(key, {}).setdefault(r["method"], []).append((r["N"], r["tflops"]))
    for panel in out.values():
        for m in panel:
            panel[m].sort()
    return out


def write_plot(path: str, rows: List[dict], title: str = "", matmul_tflops: Optional[float] = None,
               log=print) -> Optional[str]:
    """A PNG of TFLOP/s against N per method, one panel per (D, encoding) x (mask, mode).
    Returns the path, or None (with a printed note) when matplotlib is not importable."""
    series = plot_series(rows)
    if not series:
        log("plot: no successful rows, no plot written")
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"plot: matplotlib is not importable ({type(e).__name__}: {e}); skipped the PNG "
            f"(pip install matplotlib to get it; it is not a dependency of posattn)")
        return None
    row_keys = sorted({(k[0], ENCODINGS.index(k[1]) if k[1] in ENCODINGS else 99, k[1]) for k in series})
    col_keys = sorted({(k[2], MODES.index(k[3]) if k[3] in MODES else 99, k[3]) for k in series})
    nr, nc = len(row_keys), len(col_keys)
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.0 * nr), squeeze=False)
    methods = sorted({m for panel in series.values() for m in panel}, key=lambda m: (m != POSATTN, m))
    cmap = plt.get_cmap("tab10")
    color = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for i, (d, _, enc) in enumerate(row_keys):
        for j, (causal, _, mode) in enumerate(col_keys):
            ax = axes[i][j]
            panel = series.get((d, enc, causal, mode), {})
            for m in methods:
                if m in panel:
                    xs, ys = zip(*panel[m])
                    ax.plot(xs, ys, marker="o", label=m, color=color[m],
                            linewidth=2.2 if m == POSATTN else 1.2)
            if matmul_tflops:
                ax.axhline(matmul_tflops, color="grey", linestyle=":", linewidth=1, label="matmul (same run)")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"D={d} {enc} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            if panel:
                ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * nr)) if title else None)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
