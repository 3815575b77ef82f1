"""posattn against its peers: one process, the same inputs, one table.

Methods (bench/peers.py): posattn; torch SDPA with cuDNN, flash and efficient
forced in turn; FlexAttention (torch.compile) with the equivalent score_mod;
and the unfused ways (RoPE by PyTorch ops then SDPA; a dense [B, H, N, N] bias
then SDPA efficient). Encodings: none, RoPE, ALiBi, DistanceBias, softcap,
dropout; causal and not; forward and forward+backward; and decode (one query per
row against N keys, GQA 4:1, forward, against SDPA flash and FlexAttention).

Protocol (FlashAttention-3 paper): bfloat16, B*N = 16k tokens, H*D = 2048,
D in {64, 128}, N in {512 .. 16k}; FLOPs 4*B*H*N*N*D forward (halved when
causal), fwd+bwd = 3.5x forward; median of triton.testing.do_bench. --quick:
(D, N) in {(128, 8k), (64, 1k)}, the encodings other than none causal only, decode
forward only (106 rows; bench/gpu_check.py runs it).

Results: bench/results/<gpu-name-slug>_<YYYY-MM-DD>[_quick][_only-...].{md,json,png}
(--out DIR to put them elsewhere), rewritten after every group so that an
interrupted run keeps what it measured.

Without a CUDA GPU this is a tiny CPU smoke run (N=128; the Triton kernels in
the interpreter when TRITON_INTERPRET=1, the reference, SDPA on CPU, FlexAttention
forward): it checks that everything runs, its numbers mean nothing, and it
writes into a temporary directory, never into bench/results/.

    python bench/run.py [--quick] [--only TEXT ...] [--out DIR] [--list] [--commit SHA]
                        [--resume JSON] [--max-minutes M] [--smoke] [--no-plot]

A long run can be cut into pieces: --max-minutes M stops starting groups after M
minutes (the files say PARTIAL), and --resume FILE.json measures only the groups
that file lacks and rewrites it. The exit status is 1 when posattn itself failed
on some row (the files are written all the same), else 0.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import sys
import tempfile
import time
import warnings
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness  # noqa: E402
import peers  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _reset_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_ms(fn, dev: torch.device, protocol: harness.Protocol, grads) -> float:
    """Median time of one call in ms. CUDA: triton.testing.do_bench (L2 flushed per call);
    CPU: median of protocol.cpu_reps wall-clock calls. The caller has already made the
    first (compiling) call."""
    if dev.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=protocol.warmup_ms, rep=protocol.rep_ms,
                                             grad_to_none=list(grads), return_mode="median"))
    times = []
    for _ in range(max(1, protocol.cpu_reps)):
        _reset_grads(grads)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return harness.median(times)


def peak_memory(fn, dev: torch.device, grads):
    """(peak, baseline) bytes of torch.cuda.max_memory_allocated over one call; (None, None) on CPU."""
    if dev.type != "cuda":
        return None, None
    _reset_grads(grads)
    _free(dev)
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    _sync(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    _reset_grads(grads)
    return peak, base


def max_abs_diff(a, b):
    if a is None or b is None or a.shape != b.shape:
        return None
    return float((a.detach().float() - b.detach().float()).abs().max().item())


def measure_matmul(dev: torch.device, protocol: harness.Protocol) -> dict:
    n, dt = protocol.matmul_n, DTYPES[protocol.dtype]
    res = {"n": n, "dtype": protocol.dtype, "flops": harness.matmul_flops(n), "ms": None, "tflops": None,
           "note": ""}
    try:
        g = torch.Generator(device=dev).manual_seed(protocol.seed)
        a = torch.randn(n, n, generator=g, device=dev).to(dt)
        b = torch.randn(n, n, generator=g, device=dev).to(dt)
        fn = lambda: torch.matmul(a, b)
        fn()
        _sync(dev)
        ms = time_ms(fn, dev, protocol, ())
        res.update(ms=ms, tflops=harness.tflops(res["flops"], ms))
        if dev.type != "cuda":
            res["note"] = "CPU"
        del a, b
    except Exception as e:  # report, keep going: the ratios to it become '-'
        res["note"] = harness.error_note(e)
    _free(dev)
    return res


def _warning_hint(caught, limit: int = 4) -> str:
    """The first lines of the first few distinct warnings raised during a failed row: SDPA says
    why a forced backend cannot run only in warnings ('Flash attention kernel not used because:',
    then one warning per reason)."""
    lines = []
    for w in caught:
        msg = str(w.message).strip()
        line = msg.splitlines()[0].strip() if msg else ""
        if line and line not in lines:
            lines.append(line)
        if len(lines) >= limit:
            break
    hint = " ".join(lines)
    return hint if len(hint) <= 400 else hint[:397] + "..."


def measure(p: harness.Planned, inp: peers.Inputs, dev: torch.device, protocol: harness.Protocol,
            matmul_tflops, ref_out):
    """Measure one row; never raises (a failure becomes an error row). Returns (row, forward output)."""
    try:
        b = peers.build(p.method, inp)
    except Exception as e:
        return harness.make_row(p, status="error", note=harness.error_note(e), matmul_tflops=matmul_tflops), None
    backend = b.backend
    if b.skip:
        return harness.make_row(p, status="skipped", backend=backend, note=b.skip,
                                matmul_tflops=matmul_tflops), None
    grads = inp.leaves()
    out = None
    note = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            with b.context():
                _reset_grads(grads)
                out = b.fn()                      # first call: compilation, autotuning
                _sync(dev)
                diff = max_abs_diff(out, ref_out)
                ms = time_ms(b.fn, dev, protocol, grads)
                peak, base = peak_memory(b.fn, dev, grads)
        except Exception as e:                    # OOM, no kernel for this backend, compile error...
            note = harness.error_note(e, _warning_hint(caught))
    _reset_grads(grads)
    if note is not None:                          # the exception (and its frames' tensors) is gone here
        del b, out
        _free(dev)
        return harness.make_row(p, status="error", backend=backend, note=note, matmul_tflops=matmul_tflops), None
    return harness.make_row(p, status="ok", ms=ms, backend=backend, peak_bytes=peak, base_bytes=base,
                            max_abs_diff=diff, matmul_tflops=matmul_tflops), out


# --------------------------------------------------------------------------

def environment(dev: torch.device, commit_override=None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover - triton is a dependency
        triton_version = f"not importable ({type(e).__name__})"
    import posattn
    env = {
        "device_type": dev.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "posattn": getattr(posattn, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": harness.git_commit(REPO, commit_override),
        "date": harness.utc_date(),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "<unset>"),
        "posattn_backend_env": os.environ.get("POSATTN_BACKEND", "<unset>"),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "bench/run.py"]
                            + sys.argv[1:]),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(device=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), sm_count=props.multi_processor_count,
                   total_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(dev))))
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                   cuda=None, cudnn=None)
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Row ids look like D128/N4096/causal/alibi/fwd+bwd/flex "
                                        "(mask: full|causal; mode: fwd|fwd+bwd).")
    ap.add_argument("--quick", action="store_true",
                    help="small subset for a fast GPU run (about 3 min on an H200): (D, N) in "
                         "{(128, 8k), (64, 1k)}; none full + causal, RoPE / ALiBi / DistanceBias causal")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only rows whose id contains TEXT; repeat to require several "
                         "(e.g. --only D64/ --only /alibi/ ; '/fwd/' selects forward only)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="where to write the .md/.json/.png (default: bench/results on a GPU, "
                         "a temporary directory for the CPU smoke run)")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny smoke protocol (the default when there is no CUDA GPU)")
    ap.add_argument("--list", action="store_true", help="print the planned row ids and exit")
    ap.add_argument("--commit", default=None, help="git commit to record when git is not available "
                                                   "(also POSATTN_BENCH_COMMIT)")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    ap.add_argument("--resume", default=None, metavar="JSON",
                    help="keep the rows of this earlier result file and measure only the groups it lacks; "
                         "writes under the same name (into --out, default its directory)")
    ap.add_argument("--max-minutes", type=float, default=None, metavar="M",
                    help="start no new group after M minutes: write what was measured (marked partial) and "
                         "exit 0, to be continued with --resume")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or dev.type != "cuda"
    if smoke:
        protocol = harness.smoke_protocol()
    elif args.quick:
        protocol = harness.quick_protocol()
    else:
        protocol = harness.full_protocol()
    planned = harness.plan(protocol, args.only)
    grouped = harness.groups(planned)

    if smoke:
        print("=" * 78)
        print("CPU SMOKE RUN" if dev.type == "cpu" else "SMOKE RUN (--smoke)",
              "- tiny shapes; THE NUMBERS MEAN NOTHING." + (" No CUDA GPU here." if dev.type == "cpu" else ""))
        print("It only checks that every method runs; real results come from `python bench/run.py` on a GPU.")
        if dev.type == "cpu" and args.quick:
            print("(--quick is ignored without a GPU: the smoke protocol is already tiny)")
        print("=" * 78)
    shapes = (f"(D, N) in {[tuple(x) for x in protocol.pairs]}" if protocol.pairs else
              f"D in {list(protocol.head_dims)}, N in {list(protocol.seqlens)}")
    print(f"protocol {protocol.name}: {len(planned)} rows in {len(grouped)} groups "
          f"({protocol.dtype}, B*N={protocol.tokens}, H*D={protocol.hidden}, {shapes}"
          + (f", causal only: {list(protocol.causal_only)}" if protocol.causal_only else "") + ")"
          + (f", --only {args.only}" if args.only else ""))
    if args.list:
        for p in planned:
            print(p.id)
        return 0
    if not planned:
        print("nothing to run (check --only)")
        return 0

    env = environment(dev, args.commit)
    print(f"device {env['device']}; torch {env['torch']}; triton {env['triton']}; commit {env['commit']}; "
          f"TRITON_INTERPRET={env['triton_interpret']}")
    if dev.type == "cpu" and not peers.interpreting():
        print("note: TRITON_INTERPRET is not set, so posattn runs its reference backend on CPU "
              "(`make bench` sets TRITON_INTERPRET=1 when there is no NVIDIA GPU)")

    previous = harness.load_results(args.resume) if args.resume else None
    if args.out:
        out_dir = args.out
    elif args.resume:
        out_dir = os.path.dirname(os.path.abspath(args.resume))
    elif smoke:
        out_dir = tempfile.mkdtemp(prefix="posattn-bench-smoke-")
    else:
        out_dir = os.path.join(HERE, "results")
    if args.resume:
        stem = os.path.splitext(os.path.basename(args.resume))[0]
    else:
        stem = harness.result_stem("cpu-smoke" if dev.type == "cpu" else env["device"]
                                   + ("-smoke" if smoke else ""), env["date"], quick=args.quick and not smoke,
                                   only=args.only)
    proto = protocol.as_dict()
    dtype = DTYPES[protocol.dtype]

    matmul = measure_matmul(dev, protocol)
    print(f"reference matmul {matmul['n']}^3 {matmul['dtype']}: {harness._f(matmul['ms'], '{:.4g}')} ms, "
          f"{harness._f(matmul['tflops'], '{:.1f}')} TFLOP/s {matmul['note']}")

    rows, todo = [], grouped
    if previous is not None:
        if previous.get("env", {}).get("device") != env["device"]:
            print(f"warning: resuming a result from {previous.get('env', {}).get('device')!r} on {env['device']!r}")
        rows, todo = harness.split_resume(previous["rows"], grouped)
        env["resumed_from"] = [previous.get("env", {})]
        env["matmul_this_part"] = matmul
        if (previous.get("matmul") or {}).get("tflops"):
            matmul = previous["matmul"]          # one reference for every row of the file
        print(f"resuming {args.resume}: {len(rows)} rows kept, {len(todo)} of {len(grouped)} groups to measure")
    mm_tflops = matmul["tflops"]

    paths = {}
    stopped = False
    for gi, grp in enumerate(todo):
        if args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes:g} reached: {len(todo) - gi} groups left; "
                  f"continue with --resume")
            stopped = True
            break
        p0 = grp[0]
        seed = protocol.seed + zlib.crc32(p0.group.encode())
        inp = None
        ref_out = None
        try:
            inp = peers.make_inputs(p0.B, p0.H, p0.N, p0.D, causal=p0.causal, encoding=p0.encoding, mode=p0.mode,
                                    dtype=dtype, device=dev, seed=seed, left=protocol.distance_left,
                                    right=protocol.distance_right, rope_base=protocol.rope_base)
        except Exception as e:
            for p in grp:
                rows.append(harness.make_row(p, status="error", note="inputs: " + harness.error_note(e),
                                             matmul_tflops=mm_tflops))
                print(harness.format_console_row(rows[-1]))
        if inp is not None:
            group_rows = []
            for p in grp:
                row, out = measure(p, inp, dev, protocol, mm_tflops, ref_out)
                if p.method == harness.POSATTN:
                    ref_out = out
                    row["max_abs_diff"] = 0.0 if out is not None else None
                del out
                group_rows.append(row)
                harness.add_ratios(group_rows)
                print(harness.format_console_row(row))
                sys.stdout.flush()
                _free(dev)
            rows.extend(group_rows)
        del inp, ref_out
        _free(dev)
        rows = harness.order_rows(rows, planned)
        paths = harness.write_results(out_dir, stem, env, proto, matmul, rows, smoke=smoke,
                                      complete=harness.is_complete(rows, planned))

    env["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    rows = harness.order_rows(rows, planned)
    complete = harness.is_complete(rows, planned)
    paths = harness.write_results(out_dir, stem, env, proto, matmul, rows, smoke=smoke, complete=complete)
    if not args.no_plot:
        title = f"posattn vs peers: {env['device']}, torch {env['torch']}, triton {env['triton']}"
        png = harness.write_plot(os.path.join(out_dir, stem + ".png"), rows, title=title, matmul_tflops=mm_tflops)
        if png:
            paths["png"] = png

    n_ok = sum(r["status"] == "ok" for r in rows)
    n_err = len(harness.failures(rows))
    n_skip = sum(r["status"] == "skipped" for r in rows)
    print()
    print(f"{len(rows)} rows: {n_ok} ok, {n_err} failed, {n_skip} skipped; {env['elapsed_s']:.0f} s"
          + ("" if complete else f"; PARTIAL: {len(planned) - len(rows)} planned rows not measured yet"
             + (" (--max-minutes)" if stopped else "")))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if smoke:
        in_results = os.path.abspath(out_dir) == os.path.join(HERE, "results")
        print(("CPU smoke run" if dev.type == "cpu" else "smoke run") + ": the numbers above mean nothing"
              + ("." if in_results else "; nothing was written to bench/results/."))
    bad = harness.failures(rows, harness.POSATTN)
    if bad:
        print(f"posattn itself failed on {len(bad)} rows: " + ", ".join(r["id"] for r in bad[:5]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
