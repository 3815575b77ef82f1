#!/usr/bin/env python3
"""``make gpu``: one prepared command that spends a lent GPU's few minutes well.

For a GPU machine without network (the lent image: Python 3.12, torch 2.11,
Triton 3.6, CUDA 13 with nvcc and compute-sanitizer, pytest + pytest-xdist,
hypothesis, transformers, matplotlib; 16 cores, one H200; 15 minutes of device
time per session, at most 10 per command). It installs nothing from an index,
builds no venv, and uses the interpreter that runs it (``make gpu`` runs
``$(PYTHON)``, python3 by default). Every step is its own subprocess in its own
process group, with its own timeout (the whole group is killed when it runs
out), without TRITON_INTERPRET (real compilation) and without POSATTN_BACKEND:

1. install  ``pip install --no-deps --no-build-isolation --no-index -e .``
            (FORCE_CUDA / TORCH_CUDA_ARCH_LIST removed, so nothing compiles here;
            retried with --break-system-packages, then --user; a PYTHONPATH shim
            of symlinks as the last resort), then a probe: device, driver, torch,
            Triton, CUDA, cuDNN, nvcc, xdist, compute-sanitizer, and the commit.
2. cuda-build  the CUDA fallback (csrc/) built once, in the background while the
            Triton tests run: ``posattn._cuda.load_error()`` (the same just-in-time
            ninja build the tests use, into build/gpu_check/cuda-jit, for this GPU's
            architecture only); without ninja ``setup.py build_ext --inplace``
            (posattn/_C). The xdist workers wait for it before the first CUDA test
            (bench/gpu_check_plugin.py), and never start a failed build again.
3. tests    pytest -n 16 (xdist; serial with a note when it is not importable),
            TEST_SELECTION below, a JUnit report, --durations=25. No test starts
            in the last TESTS_LAST_START_S seconds (the plugin skips it), so pytest
            ends by itself and writes its report; a JSON line per test start / end
            (build/gpu_check/progress.jsonl) still says what ran if it is killed.
4. sanitizer  compute-sanitizer memcheck (--leak-check no), then racecheck, on
            bench/sanitize_case.py triton / cuda (both backends at once), with
            PYTORCH_NO_CUDA_MEMORY_CACHING=1. A missing or refusing tool (no
            permission, unsupported) is "skipped (refused)", not a failure.
5. bench    ``bench/run.py --quick`` (posattn vs cuDNN / flash / efficient SDPA and
            FlexAttention; none, causal, RoPE, ALiBi, DistanceBias; D 128 at N 8k
            and D 64 at N 1k; fwd and fwd+bwd; the matmul ceiling in the same
            run) with --max-minutes so that a partial table is still written.

Results (at most 8 files, plain names) go to ``<out>/gpu_<device>_<date>/``
(``--out``, ``make gpu GPU_OUT=dir``; default bench/results): summary.md
(rewritten after every step: device, versions and commit at the top, then each
step's status, wall time, counts and failures), steps.log (install, probe, build
and benchmark output), pytest.log, pytest.xml (JUnit), sanitizer.log, and the
benchmark's <gpu>_<date>_quick.md / .json / .png. The exit status is 0 only when
every step passed ("skipped (refused)" sanitizer runs and a partial benchmark
count as passed; tests cut by the budget do not).

``--dry-run`` (``make gpu DRY_RUN=1``) prints this plan with its commands and
timeouts and checks that every test file, test node id (parsed with ast: the
function, and any parametrized id named) and script it names exists; it needs no
GPU, no torch and no network, and takes well under a second.

Budgets (seconds; every timeout is also capped so that the whole run ends within
TOTAL_BUDGET_S, 8 min 30 s, keeping each later step's floor): install 60 (pip) +
45 (probe), typically 15; cuda-build 200 in the background, typically 30-60;
tests 240; sanitizer 2 x 60 (two tools, the backends in parallel), typically
about 60; bench what is left, at most 200 (about 180), --max-minutes leaving 50 s
for the group in flight and the plot.

Estimate of what the tests step compiles (2026-11-29; compilation, not running,
dominates). Counted from ``TRITON_INTERPRET=1 pytest --collect-only -q`` on the
selection (397 test ids then: test_kernels 139, test_relative 34 of which ~27 launch
kernels, test_no_silent 34 (~20 launch kernels), test_api 2, test_property 1 x 25
hypothesis draws, test_compile 2 x 8 cases, test_gpu_large 4, test_hf 9,
test_cuda_backend 172; since then test_cuda_backend's cases are test_kernels'
backend="cuda" twins), times the kernels one call compiles: the forward, then in
the backward the delta kernel or (with a parameter gradient) the dQ kernel's
delta pass, dK/dV and dQ, plus dBias for a float bias with a gradient and the
aK/aV pass for rel_emb: 4-5 per test, each a distinct constexpr set (encoding
flags x mask flags x dtype x BLOCK_D) or int specialisation (sizes and strides
% 16). test_encoding_mask_dtype alone is 99 x ~4 = ~380 (the delta kernel
deduplicates); the rest of test_kernels ~180, test_relative ~120, test_no_silent
~80, the property test ~110, test_compiled_cuda ~145 (eager and Inductor each
compile the kernels) plus ~250 small Inductor kernels, the large test ~10. About
1050 posattn kernel variants (+-25%) and ~250 Inductor ones, at ~1-3 s each:
~2000-3000 CPU-seconds, ~2.5-3 minutes on 16 workers. The serial long poles are
test_property (25 draws, ~110 compiles, ~3-4 min) and test_compiled_cuda[float32]
(~3 min): they start first. The CUDA fallback compiles once (one architecture),
and test_cuda_backend's 172 tests then only run; test_hf runs its CPU models on
the reference backend there (no kernel: the first thing to trim). On the GPU the
step records what was really compiled (new .cubin files in TRITON_CACHE_DIR and
in Inductor's cache), each test's duration, the 25 slowest (--durations=25) and,
if it is cut short, what was still running: trim TEST_SELECTION (or pass
--select) by those numbers.
"""
from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------- what runs (trim here)
# pytest arguments, in order: xdist hands tests out round-robin in this order, so
# the long single tests come first and the CUDA fallback's last (they wait for
# the background build). Files / node ids that only run on CPU on a GPU machine
# are left out: test_nn (modules on CPU tensors: the reference backend there),
# the rest of test_api (argument checks on CPU), test_reference, test_cuda_emulated,
# test_cuda_build / test_aot_compile (compile checks CI already runs).
TEST_SELECTION = [
    "tests/test_property.py::test_random_configurations",      # 25 draws, serial: the long pole
    "tests/test_compile.py::test_compiled_cuda",               # Inductor, 8 cases x 2 dtypes
    "tests/test_gpu_large.py::test_offsets_past_2_31_elements[triton-long_keys]",
    "tests/test_gpu_large.py::test_offsets_past_2_31_elements[triton-many_heads]",
    "tests/test_kernels.py",                                   # every case x {triton, cuda}, fwd + grads
    "tests/test_relative.py",                                  # GridBias, Shaw, Transformer-XL kernels
    "tests/test_no_silent.py",                                 # double backward, int32 edges, autocast, ...
    "tests/test_design.py::test_cases_on_the_triton_backend",  # the registry's cases (KERPLE included)
    "tests/test_dropout.py",                                   # Philox keep-mask vs the reference, statistics
    "tests/test_varlen.py",                                    # packed sequences (VARLEN kernels)
    "tests/test_decode.py",                                    # split-key decoding kernels and the H100 plan
    "tests/test_rope_axes.py",                                 # multi-axis RoPE (rotation passes), Qwen2-VL
    "tests/test_api.py::test_auto_selects_triton_on_kernel_device",
    "tests/test_api.py::test_triton_backend_runs_and_returns_lse",
    "tests/test_hf.py",  # CPU float32 models: the reference backend there (checks the image's transformers)
    "tests/test_gpu_large.py::test_offsets_past_2_31_elements[cuda-long_keys]",
    "tests/test_gpu_large.py::test_offsets_past_2_31_elements[cuda-many_heads]",
    "tests/test_cuda_backend.py",                              # the CUDA fallback's own checks
]
# Tests that need the CUDA extension: the workers wait for the background build first
# (and for test_kernels' backend="cuda" twins: bench/gpu_check_plugin.py).
WAIT_FOR_CUDA_BUILD = (
    "tests/test_cuda_backend.py",
    "tests/test_gpu_large.py::test_offsets_past_2_31_elements[cuda-",
)
SANITIZER_TOOLS = ("memcheck", "racecheck")
SANITIZER_BACKENDS = ("triton", "cuda")
SANITIZER_PARALLEL = True       # both backends under one tool at once (two processes, one GPU)
STEPS = ("install", "cuda-build", "tests", "sanitizer", "bench")
SCRIPTS = ("setup.py", "bench/run.py", "bench/harness.py", "bench/peers.py", "bench/sanitize_case.py",
           "bench/gpu_check_plugin.py", "posattn/_cuda.py", "csrc/ops.cpp", "csrc/attn_fwd.cu",
           "csrc/attn_bwd.cu", "csrc/attn_dbias.cu")
RUN_PY_OPTIONS = ("--quick", "--out", "--max-minutes", "--commit")

# ----------------------------------------------------------------------------- budgets (seconds)
TOTAL_BUDGET_S = 510            # the whole run, + up to ~15 s of kills: under 9 min (a device command may run 10)
PIP_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 45
CUDA_BUILD_TIMEOUT_S = 200      # in the background, during the tests
TESTS_TIMEOUT_S = 240
TESTS_LAST_START_S = 45         # no test starts in the step's last 45 s
TESTS_INTERRUPT_S = 20          # SIGINT to pytest 20 s before the hard kill (it writes its report)
SANITIZER_TIMEOUT_S = {"triton": 60, "cuda": 40}   # one compute-sanitizer run
BENCH_TIMEOUT_S = 200
BENCH_TAIL_S = 50               # --max-minutes = (timeout - 50 s) / 60: the group in flight, the plot
FLOOR_S = {"tests": 60, "sanitizer": 30, "bench": 60}   # kept for the later steps
XDIST_WORKERS = 16
MAX_FILES = 8
LOG_CAP_BYTES = 3 * 2 ** 20     # per log contribution: head and tail kept beyond it

WORK = REPO / "build" / "gpu_check"  # caches and scratch (ignored by git, kept on a warm machine)
OK_STATUSES = ("passed", "passed (partial)", "passed (some skipped)", "skipped (refused)")
REFUSAL_RE = re.compile(r"permission|not supported|unsupported|not permitted|insufficient|NVGPUCTRPERM|"
                        r"refused|disabled|unable to (?:load|find|open|initiali|access)|injection",
                        re.IGNORECASE)
PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


# ============================================================================= static checks

def _literal(node, consts):
    """The value of an AST node that is a literal or a module-level constant name."""
    if isinstance(node, ast.Name) and node.id in consts:
        return consts[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list" \
            and len(node.args) == 1:
        return list(_literal(node.args[0], consts))
    return ast.literal_eval(node)


def _module_constants(tree) -> dict:
    out = {}
    for st in tree.body:
        if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
            try:
                out[st.targets[0].id] = _literal(st.value, out)
            except Exception:
                pass
    return out


def _id_of(value, argname: str, index: int) -> str:
    """pytest's id of one argument value: str / number / bool / None as text, anything
    else argname + index."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return str(value)
    return f"{argname}{index}"


def static_param_ids(tree, func) -> Optional[List[str]]:
    """The parametrized ids of ``func`` when its @pytest.mark.parametrize decorators
    can be read statically (literal ids= or literal argument values), else None."""
    consts = _module_constants(tree)
    per_decorator = []
    for dec in func.decorator_list:
        if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "parametrize"):
            continue
        kw = {k.arg: k.value for k in dec.keywords}
        try:
            if "ids" in kw:
                ids = [str(x) for x in _literal(kw["ids"], consts)]
            else:
                names = _literal(dec.args[0] if dec.args else kw["argnames"], consts)
                names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
                values = _literal(dec.args[1] if len(dec.args) > 1 else kw["argvalues"], consts)
                if len(names) == 1:
                    ids = [_id_of(v, names[0], i) for i, v in enumerate(values)]
                else:
                    ids = ["-".join(_id_of(x, n, i) for x, n in zip(v, names)) for i, v in enumerate(values)]
        except Exception:
            return None
        per_decorator.append(ids)
    if not per_decorator:
        return None
    combos = [""]
    for ids in reversed(per_decorator):  # the decorator nearest the function comes first in the id
        combos = [f"{c}-{i}" if c else i for c in combos for i in ids]
    return combos


def _find_def(tree, names):
    body = tree.body
    node = None
    for name in names:
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == name), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node


def check_selection(selection, repo: Path = REPO) -> List[str]:
    """Problems with pytest arguments (file, file::function, file::Class::method,
    file::function[param-id]); [] when every one exists."""
    problems = []
    for entry in selection:
        path, sep, rest = entry.partition("::")
        f = repo / path
        if not f.is_file():
            problems.append(f"{entry}: no file {path}")
            continue
        if not sep:
            continue
        name, bracket, param = rest.partition("[")
        if bracket and not param.endswith("]"):
            problems.append(f"{entry}: unbalanced [ in the node id")
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        except SyntaxError as e:
            problems.append(f"{entry}: {path} does not parse ({e})")
            continue
        node = _find_def(tree, name.split("::"))
        if node is None or isinstance(node, ast.ClassDef) and bracket:
            problems.append(f"{entry}: no test {name} in {path}")
            continue
        if bracket:
            ids = static_param_ids(tree, node)
            if ids is None:
                problems.append(f"{entry}: the parametrized ids of {name} cannot be read statically")
            elif param[:-1] not in ids:
                problems.append(f"{entry}: no parametrized id [{param[:-1]}] (known: {', '.join(ids[:8])}"
                                f"{', ...' if len(ids) > 8 else ''})")
    return problems


def check_scripts(repo: Path = REPO) -> List[str]:
    problems = [f"missing {s}" for s in SCRIPTS if not (repo / s).is_file()]
    run_py = repo / "bench" / "run.py"
    if run_py.is_file():
        src = run_py.read_text(encoding="utf-8")
        problems += [f"bench/run.py has no option {o}" for o in RUN_PY_OPTIONS
                     if not re.search(r"add_argument\(\s*[\"']" + re.escape(o) + r"[\"']", src)]
    return problems


# ============================================================================= small helpers

def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "unknown"


def quote(cmd) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def quick(cmd, timeout=20, cwd=REPO):
    """(rc, stdout) of a short command; (None, why) when it cannot run."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout or "") + (r.stderr or "")
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def cap_file(path: Path, cap: int = LOG_CAP_BYTES) -> None:
    """Keep a log under `cap` bytes: its first quarter and its end."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= cap:
        return
    with open(path, "rb") as f:
        head = f.read(cap // 4)
        f.seek(size - (cap - cap // 4))
        tail = f.read()
    with open(path, "wb") as f:
        f.write(head + f"\n\n[... {size - len(head) - len(tail)} bytes cut by gpu_check ...]\n\n".encode() + tail)


def append_log(target: Path, header: str, source: Path) -> None:
    cap_file(source)
    with open(target, "ab") as out:
        out.write(f"\n===== {header} =====\n".encode())
        try:
            out.write(source.read_bytes())
        except OSError as e:
            out.write(f"(no output: {e})\n".encode())


def count_cubins(*dirs) -> int:
    n = 0
    for d in dirs:
        if d and Path(d).is_dir():
            for _root, _dirs, files in os.walk(d):
                n += sum(f.endswith(".cubin") for f in files)
    return n


def first_line(text: str, limit: int = 300) -> str:
    for ln in str(text or "").splitlines():
        ln = ln.strip()
        if ln:
            return ln if len(ln) <= limit else ln[:limit - 3] + "..."
    return ""


# ============================================================================= subprocess jobs

_RUNNING: List["Job"] = []


class Job:
    """One subprocess in its own process group, output to a log file, a timeout.
    interrupt_s > 0: SIGINT to the leader that many seconds before the hard kill."""

    def __init__(self, name, cmd, timeout, env, log, interrupt_s=0.0, cwd=REPO, on_exit=None):
        self.name, self.cmd, self.timeout, self.env, self.log = name, [str(c) for c in cmd], timeout, env, Path(log)
        self.interrupt_s, self.cwd, self.on_exit = interrupt_s, cwd, on_exit
        self.proc = None
        self.rc = None
        self.timed_out = False
        self.interrupted = False
        self.t0 = self.t1 = None
        self._fh = None

    @property
    def wall(self) -> float:
        if self.t0 is None:
            return 0.0
        return (self.t1 or time.monotonic()) - self.t0

    def start(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")
        self._fh.write(f"$ {quote(self.cmd)}\n".encode())
        self._fh.flush()
        self.t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self._fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as e:
            self._fh.write(f"cannot start: {e}\n".encode())
            self._finish(127)
            return self
        _RUNNING.append(self)
        return self

    def _finish(self, rc):
        self.rc = rc
        self.t1 = time.monotonic()
        if self._fh:
            note = " (timed out)" if self.timed_out else ""
            self._fh.write(f"\n[exit {rc}{note} after {self.wall:.1f} s]\n".encode())
            self._fh.close()
            self._fh = None
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.on_exit:
            self.on_exit(self)

    def kill(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def poll(self) -> bool:
        """True once finished (killing it when its time is up)."""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        if rc is not None:
            self._finish(rc)
            return True
        elapsed = self.wall
        if self.interrupt_s and not self.interrupted and elapsed > self.timeout - self.interrupt_s:
            self.interrupted = True
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        if elapsed > self.timeout:
            self.timed_out = True
            self.kill()
            self._finish(self.proc.poll() if self.proc.poll() is not None else -9)
            return True
        return False


def run_jobs(jobs: List[Job]) -> List[Job]:
    for j in jobs:
        if j.rc is None and j.proc is None:
            j.start()
    while not all(j.poll() for j in jobs):
        time.sleep(0.2)
    return jobs


def kill_all():
    for j in list(_RUNNING):
        j.kill()
        if j.rc is None:
            j._finish(-15)


# ============================================================================= the run

class Check:
    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.deadline = self.t_start + TOTAL_BUDGET_S
        self.started_utc = now_utc()
        self.py = sys.executable or "python3"
        self.selection = list(args.select or TEST_SELECTION)
        self.steps_wanted = [s for s in STEPS if s in (args.steps or STEPS)]
        self.meta: Dict[str, object] = {}
        self.steps: Dict[str, dict] = {}
        self.shim = None
        self.out_parent = Path(args.out) if args.out else REPO / "bench" / "results"
        self.run_dir: Optional[Path] = None
        self.env = self._base_env()

    # ------------------------------------------------------------------ environment
    def _base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "POSATTN_BACKEND")}
        env.update(
            PYTHONUNBUFFERED="1",
            TRITON_CACHE_DIR=str(WORK / "triton-cache"),
            TORCHINDUCTOR_CACHE_DIR=str(WORK / "inductor-cache"),
            POSATTN_CUDA_BUILD_DIR=str(WORK / "cuda-jit"),
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
            PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
        )
        return env

    def left(self, later_floor=0.0) -> float:
        return self.deadline - time.monotonic() - later_floor

    def step_timeout(self, step, cap) -> float:
        order = ["tests", "sanitizer", "bench"]
        later = sum(FLOOR_S[s] for s in order[order.index(step) + 1:] if s in self.steps_wanted) \
            if step in order else 0
        return max(0.0, min(cap, self.left(later)))

    # ------------------------------------------------------------------ output
    def make_run_dir(self):
        rc, out = quick(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        if rc == 0 and out.strip():
            name, driver, mem = ([x.strip() for x in out.strip().splitlines()[0].split(",")] + ["", "", ""])[:3]
            self.meta.update(smi_name=name, driver=driver, smi_memory=mem)
        else:
            self.meta["driver"] = f"nvidia-smi failed: {first_line(out)}"
        base = f"gpu_{slug(self.meta.get('smi_name') or 'unknown-gpu')}_{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}"
        d = self.out_parent / base
        n = 2
        while d.exists() and any(d.iterdir()):
            d = self.out_parent / f"{base}_{n}"
            n += 1
        d.mkdir(parents=True, exist_ok=True)
        self.run_dir = d
        WORK.mkdir(parents=True, exist_ok=True)

    def git_info(self):
        if self.args.commit:
            self.meta["commit"] = self.args.commit
            self.meta["commit_source"] = "--commit"
            return
        rc, out = quick(["git", "rev-parse", "HEAD"])
        if rc == 0 and re.fullmatch(r"[0-9a-f]{40}", out.strip()):
            self.meta["commit"] = out.strip()
            rc2, st = quick(["git", "status", "--porcelain", "--untracked-files=no"])
            self.meta["dirty"] = None if rc2 != 0 else bool(st.strip())
            self.meta["dirty_files"] = [ln[3:] for ln in st.splitlines()[:20]] if rc2 == 0 else []
            self.meta["commit_source"] = "git rev-parse HEAD"
        else:
            self.meta["commit"] = "unknown (no git here: pass --commit / GPU_COMMIT=<sha>)"
            self.meta["commit_source"] = first_line(out)

    def record(self, name, **fields):
        st = self.steps.setdefault(name, {"name": name, "status": "pending", "wall": None, "timeout": None,
                                          "counts": "", "notes": [], "failures": [], "details": []})
        st.update(fields)
        return st

    def note(self, name, text):
        self.record(name)["notes"].append(text)

    def write_summary(self, final=False):
        if self.run_dir is None:
            return
        text = render_summary(self, final)
        tmp = self.run_dir / "summary.md.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.run_dir / "summary.md")
        return text

    @property
    def steps_log(self) -> Path:
        return self.run_dir / "steps.log"

    def job_log(self, name) -> Path:
        return WORK / f"job-{name}.log"

    # ------------------------------------------------------------------ 1. install + probe
    def do_install(self):
        name = "install"
        t0 = time.monotonic()
        self.record(name, status="running", timeout=PIP_TIMEOUT_S + PROBE_TIMEOUT_S)
        self.write_summary()
        if "install" in self.steps_wanted:
            pip_env = {k: v for k, v in self.env.items() if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")}
            base = [self.py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
            attempts = [base, base + ["--break-system-packages"], base + ["--user"]]
            how = None
            for i, cmd in enumerate(attempts):
                left = PIP_TIMEOUT_S - (time.monotonic() - t0)
                if left < 5:
                    break
                log = self.job_log(f"pip{i}")
                log.unlink(missing_ok=True)
                j = run_jobs([Job(f"pip{i}", cmd, left, pip_env, log)])[0]
                append_log(self.steps_log, f"install: {quote(cmd)} (exit {j.rc}, {j.wall:.1f} s)", log)
                if j.rc == 0:
                    how = "pip install -e ." + ("" if i == 0 else " " + cmd[-1])
                    break
                text = log.read_text(errors="replace")
                if i == 0 and "externally-managed" not in text and "ermission" not in text:
                    break   # the retries only help against PEP 668 and read-only site-packages
            if how is None:
                self.shim = make_shim()
                self.env["PYTHONPATH"] = os.pathsep.join(x for x in (str(self.shim), self.env.get("PYTHONPATH"))
                                                         if x)
                how = f"pip failed (see steps.log); PYTHONPATH shim {rel(self.shim)}"
                self.note(name, how)
            self.meta["install"] = how
        else:
            self.meta["install"] = "skipped (--steps): the installed posattn is used"
        # probe
        log = self.job_log("probe")
        log.unlink(missing_ok=True)
        j = run_jobs([Job("probe", [self.py, str(HERE / "gpu_check.py"), "--probe"], PROBE_TIMEOUT_S, self.env,
                          log)])[0]
        append_log(self.steps_log, f"probe (exit {j.rc}, {j.wall:.1f} s)", log)
        probe = {}
        for ln in log.read_text(errors="replace").splitlines():
            if ln.startswith("GPU_CHECK_PROBE "):
                probe = json.loads(ln[len("GPU_CHECK_PROBE "):])
        self.meta.update(probe=probe)
        cap = probe.get("capability")
        if cap:
            self.env["TORCH_CUDA_ARCH_LIST"] = cap     # one architecture: the JIT build and the tests agree
        problems = []
        if not probe:
            problems.append(f"the probe printed nothing (exit {j.rc}{', timed out' if j.timed_out else ''})")
        else:
            if not probe.get("posattn_ok"):
                problems.append(f"posattn does not import: {probe.get('posattn_error')}")
            if not probe.get("cuda_available"):
                if self.args.allow_no_gpu:
                    self.note(name, "torch.cuda.is_available() is False (--allow-no-gpu: going on)")
                else:
                    problems.append("torch.cuda.is_available() is False")
        self.record(name, wall=time.monotonic() - t0, status="failed" if problems else "passed",
                    counts=self.meta.get("install", ""))
        for p in problems:
            self.record(name)["failures"].append(p)
        self.write_summary()
        return not problems

    # ------------------------------------------------------------------ 2 + 3. cuda-build || tests
    def cuda_build_job(self) -> Optional[Job]:
        name = "cuda-build"
        probe = self.meta.get("probe", {})
        status_file = WORK / "cuda-build.status"
        status_file.unlink(missing_ok=True)
        self.env["GPU_CHECK_BUILD_STATUS"] = str(status_file)
        self.env["GPU_CHECK_WAIT_FOR"] = ",".join(WAIT_FOR_CUDA_BUILD)
        if "cuda-build" not in self.steps_wanted:
            status_file.write_text("ok")   # the tests load whatever is there (or skip)
            self.record(name, status="skipped (--steps)")
            return None
        if not probe.get("cuda_home"):
            why = "nvcc / CUDA_HOME not found by torch.utils.cpp_extension"
            status_file.write_text(f"failed: {why}")
            self.record(name, status="failed", failures=[why], wall=0.0)
            return None
        env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 8), POSATTN_CUDA_VERBOSE="1")
        if probe.get("ninja"):
            cmd = [self.py, str(HERE / "gpu_check.py"), "--build-cuda"]
            how = f"just-in-time (ninja) into {rel(env['POSATTN_CUDA_BUILD_DIR'])}"
        else:
            cmd = [self.py, "setup.py", "build_ext", "--inplace"]
            env.update(FORCE_CUDA="1")
            how = "ahead of time (no ninja): setup.py build_ext --inplace -> posattn/_C"
        timeout = min(CUDA_BUILD_TIMEOUT_S, self.step_timeout("tests", TESTS_TIMEOUT_S))
        self.record(name, status="running", timeout=round(timeout), counts=how)
        log = self.job_log("cuda-build")
        log.unlink(missing_ok=True)

        def done(job):
            ok = job.rc == 0 and not job.timed_out
            if not ok:
                lock = Path(env["POSATTN_CUDA_BUILD_DIR"]) / "lock"   # torch's FileBaton, left by a kill
                lock.unlink(missing_ok=True)
                self.env["POSATTN_CUDA_JIT"] = "0"    # the later steps do not build it again
            text = log.read_text(errors="replace")
            why = next((ln for ln in reversed(text.splitlines()) if "GPU_CHECK_BUILD" in ln), "")
            status_file.write_text("ok" if ok else f"failed: {why or f'exit {job.rc}'}"
                                   + (" (timed out)" if job.timed_out else ""))
            if ok and self.shim is not None:
                make_shim()                  # link a new posattn/_C*.so into the shim
            self.record(name, status="passed" if ok else ("timeout" if job.timed_out else "failed"),
                        wall=job.wall)
            if not ok:
                tail = [ln for ln in text.splitlines() if ln.strip()][-6:]
                self.record(name)["failures"].extend(["; ".join(tail)[-600:] or f"exit {job.rc}"])
            append_log(self.steps_log, f"cuda-build: {quote(job.cmd)} (exit {job.rc}, {job.wall:.1f} s)", log)
            self.write_summary()

        return Job("cuda-build", cmd, timeout, env, log, on_exit=done)

    def pytest_cmd(self, workers: int) -> List[str]:
        """workers: xdist processes (0: serial, xdist not importable)."""
        cmd = [self.py, "-m", "pytest", *self.selection]
        if workers:
            cmd += ["-n", str(workers), "--dist", "load"]
        cmd += ["-p", "gpu_check_plugin", "-p", "no:cacheprovider", "-q", "-rfE", "--tb=short", "--durations=25",
                f"--junitxml={self.run_dir / 'pytest.xml' if self.run_dir else '<run dir>/pytest.xml'}",
                "-o", "junit_family=xunit2"]
        return cmd

    def do_tests(self):
        name = "tests"
        build = self.cuda_build_job()
        if "tests" not in self.steps_wanted:
            self.record(name, status="skipped (--steps)")
            if build:
                run_jobs([build])
            return
        timeout = self.step_timeout("tests", TESTS_TIMEOUT_S)
        if timeout < FLOOR_S["tests"]:
            self.record(name, status="skipped (no time left)")
            if build:
                run_jobs([build])
            return
        probe = self.meta.get("probe", {})
        xdist = bool(probe.get("xdist"))
        if not xdist:
            self.note(name, "pytest-xdist is not importable: the tests run serially (most will be cut by the "
                            "budget; trim TEST_SELECTION or pass --select)")
        progress = WORK / "progress.jsonl"
        progress.unlink(missing_ok=True)
        (self.run_dir / "pytest.xml").unlink(missing_ok=True)
        env = dict(self.env)
        env.update(
            PYTHONPATH=os.pathsep.join(x for x in (str(HERE), env.get("PYTHONPATH")) if x),
            GPU_CHECK_DEADLINE=str(time.time() + timeout - TESTS_LAST_START_S),
            GPU_CHECK_PROGRESS=str(progress), GPU_CHECK_XDIST="1" if xdist else "0",
            TORCHINDUCTOR_COMPILE_THREADS="1",   # 16 workers already use the cores
        )
        cubins0 = count_cubins(env["TRITON_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"])
        triton0 = count_cubins(env["TRITON_CACHE_DIR"])
        cmd = self.pytest_cmd(max(1, min(XDIST_WORKERS, os.cpu_count() or 1)) if xdist else 0)
        self.record(name, status="running", timeout=round(timeout), command=quote(cmd))
        self.write_summary()
        log = self.run_dir / "pytest.log"
        job = Job("tests", cmd, timeout, env, log, interrupt_s=TESTS_INTERRUPT_S)
        jobs = [job] + ([build] if build else [])
        if build:
            build.start()                    # first: the workers' first CUDA test waits for it
        run_jobs(jobs)
        cap_file(log)
        triton1 = count_cubins(env["TRITON_CACHE_DIR"])
        cubins1 = count_cubins(env["TRITON_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"])
        res = summarize_tests(self.run_dir / "pytest.xml", progress)
        st = self.record(name, wall=job.wall, counts=res["counts"], failures=res["failures"],
                         details=res["details"])
        st["notes"].append(f"kernels compiled (new .cubin files): {triton1 - triton0} in TRITON_CACHE_DIR "
                           f"(posattn's Triton kernels), {cubins1 - cubins0 - (triton1 - triton0)} in Inductor's "
                           f"cache (torch.compile)")
        if job.timed_out or job.interrupted:
            status = "timeout" + (" (interrupted: its report is complete up to there)" if not job.timed_out else "")
        elif job.rc == 0:
            status = "incomplete" if res["budget_skipped"] else "passed"
        elif job.rc == 1:
            status = "failed"
        else:
            status = f"error (pytest exit {job.rc})"
        st["status"] = status
        self.write_summary()

    # ------------------------------------------------------------------ 4. compute-sanitizer
    def do_sanitizer(self):
        name = "sanitizer"
        if "sanitizer" not in self.steps_wanted:
            self.record(name, status="skipped (--steps)")
            return
        t0 = time.monotonic()
        timeout = self.step_timeout("sanitizer", 2 * max(SANITIZER_TIMEOUT_S.values()))
        if timeout < FLOOR_S["sanitizer"]:
            self.record(name, status="skipped (no time left)")
            return
        self.record(name, status="running", timeout=round(timeout))
        self.write_summary()
        tool = self.meta.get("probe", {}).get("compute_sanitizer") or shutil.which("compute-sanitizer")
        if not tool:
            self.record(name, status="skipped (refused)", wall=0.0,
                        counts="compute-sanitizer not found (PATH, CUDA_HOME/bin)")
            self.write_summary()
            return
        env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        log_all = self.run_dir / "sanitizer.log"
        results = []
        for ti, tname in enumerate(SANITIZER_TOOLS):
            left = timeout - (time.monotonic() - t0)
            per = left / (len(SANITIZER_TOOLS) - ti)
            jobs = []
            for backend in SANITIZER_BACKENDS:
                cmd = sanitizer_cmd(tool, tname, self.py, backend)
                log = self.job_log(f"{tname}-{backend}")
                log.unlink(missing_ok=True)
                jobs.append(Job(f"{tname}-{backend}", cmd, min(SANITIZER_TIMEOUT_S[backend], per), env, log))
            if SANITIZER_PARALLEL:
                run_jobs(jobs)
            else:
                for j in jobs:
                    j.timeout = min(j.timeout, max(1.0, timeout - (time.monotonic() - t0)))
                    run_jobs([j])
            for j in jobs:
                r = judge_sanitizer(j, j.log.read_text(errors="replace"))
                results.append(r)
                append_log(log_all, f"{j.name}: {quote(j.cmd)} (exit {j.rc}, {j.wall:.1f} s) -> {r['status']}",
                           j.log)
            self.record(name, details=[f"{r['name']}: {r['status']} ({r['why']}, {r['wall']:.0f} s)"
                                       for r in results])
            self.write_summary()
        statuses = [r["status"] for r in results]
        if any(s not in ("passed", "skipped", "refused") for s in statuses):
            status = "failed"
        elif all(s == "passed" for s in statuses):
            status = "passed"
        elif any(s == "refused" for s in statuses):
            status = "skipped (refused)"
        else:
            status = "passed (some skipped)"
        errors = sum(r["errors"] or 0 for r in results)
        self.record(name, status=status, wall=time.monotonic() - t0,
                    counts=f"{statuses.count('passed')} passed, {len(statuses) - statuses.count('passed')} not; "
                           f"{errors} sanitizer errors",
                    failures=[f"{r['name']}: {r['why']}" for r in results
                              if r["status"] not in ("passed", "skipped", "refused")])
        self.write_summary()

    # ------------------------------------------------------------------ 5. benchmark
    def bench_cmd(self, timeout: float) -> List[str]:
        cmd = [self.py, str(HERE / "run.py"), "--quick", "--out", str(self.run_dir or "<run dir>"),
               "--max-minutes", f"{max(0.5, (timeout - BENCH_TAIL_S) / 60):.2f}"]
        commit = self.meta.get("commit") if self.meta.get("commit_source") == "--commit" else None
        if commit:
            cmd += ["--commit", str(commit)]
        return cmd

    def do_bench(self):
        name = "bench"
        if "bench" not in self.steps_wanted:
            self.record(name, status="skipped (--steps)")
            return
        timeout = self.step_timeout("bench", BENCH_TIMEOUT_S)
        if timeout < FLOOR_S["bench"]:
            self.record(name, status="skipped (no time left)")
            return
        cmd = self.bench_cmd(timeout)
        self.record(name, status="running", timeout=round(timeout), command=quote(cmd))
        self.write_summary()
        before = set(self.run_dir.glob("*.json"))
        log = self.job_log("bench")
        log.unlink(missing_ok=True)
        j = run_jobs([Job("bench", cmd, timeout, self.env, log)])[0]
        append_log(self.steps_log, f"bench: {quote(cmd)} (exit {j.rc}, {j.wall:.1f} s)", log)
        for tmp in self.run_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        files = sorted(set(self.run_dir.glob("*.json")) | before, key=lambda p: p.stat().st_mtime)
        res = summarize_bench(files[-1] if files else None, log.read_text(errors="replace"))
        if j.timed_out:
            status = "timeout"
        elif j.rc == 0:
            status = "passed" if res["complete"] else "passed (partial)"
        else:
            status = "failed"
        self.record(name, status=status, wall=j.wall, counts=res["counts"], failures=res["failures"],
                    details=res["details"])
        self.write_summary()

    # ------------------------------------------------------------------ all
    def run(self) -> int:
        self.make_run_dir()
        self.git_info()
        print(f"gpu_check: results in {rel(self.run_dir)}/ (budget {TOTAL_BUDGET_S} s)", flush=True)
        for s in STEPS:
            self.record(s)
        current = None
        try:
            current = "install"
            ok = self.do_install()
            self._progress("install")
            if not ok:
                for s in ("cuda-build", "tests", "sanitizer", "bench"):
                    self.record(s, status="blocked (install / probe failed)")
            else:
                current = "tests"
                self.do_tests()
                self._progress("cuda-build")
                self._progress("tests")
                current = "sanitizer"
                self.do_sanitizer()
                self._progress("sanitizer")
                current = "bench"
                self.do_bench()
                self._progress("bench")
            current = None
        except KeyboardInterrupt:
            kill_all()
            if current:
                self.record(current, status="interrupted")
                if current == "tests":
                    st = self.steps.get("cuda-build")
                    if st and st["status"] == "running":
                        st["status"] = "interrupted"
            self.write_summary(final=True)
            print("gpu_check: interrupted; summary written", flush=True)
            return 130
        self.meta["elapsed"] = time.monotonic() - self.t_start
        tidy_run_dir(self)
        text = self.write_summary(final=True)
        print(text, flush=True)
        return 0 if all(self.steps[s]["status"] in OK_STATUSES or self.steps[s]["status"].startswith("skipped (--")
                        for s in STEPS) else 1

    def _progress(self, s):
        st = self.steps.get(s) or {}
        wall = st.get("wall")
        print(f"gpu_check: {s}: {st.get('status')}" + (f" in {wall:.0f} s" if wall is not None else "")
              + (f" ({st.get('counts')})" if st.get("counts") else ""), flush=True)


def sanitizer_cmd(tool, tname, py, backend) -> List[str]:
    cmd = [tool, "--tool", tname]
    if tname == "memcheck":
        cmd += ["--leak-check", "no"]
    return cmd + ["--target-processes", "application-only", "--print-limit", "100",
                  py, str(HERE / "sanitize_case.py"), backend]


def judge_sanitizer(job: Job, text: str) -> dict:
    m = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
    errors = int(m[-1]) if m else None
    race = re.findall(r"RACECHECK SUMMARY:.*?\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)", text)
    if race:   # racecheck: hazards at error level fail, warnings are reported
        errors = max(errors or 0, int(race[-1][0]))
    started = "SANITIZE-CASE: start" in text
    r = {"name": job.name, "errors": errors, "wall": job.wall}
    if job.timed_out:
        r.update(status="timeout", why=f"killed after {job.timeout:.0f} s")
    elif "SANITIZE-CASE: skip" in text:
        r.update(status="skipped", why=first_line(text[text.index("SANITIZE-CASE: skip"):]))
    elif not started and job.rc != 0 and not errors:
        # the tool's own refusal: its lines start with "=========" or name it (never the case's own errors)
        own = [ln for ln in text.splitlines()[1:] if ln.startswith("=========") or "sanitizer" in ln.lower()]
        hit = next((ln for ln in own if REFUSAL_RE.search(ln)), None)
        line = first_line(hit) if hit else first_line("\n".join(text.splitlines()[1:]))
        r.update(status="refused" if hit else "failed", why=f"exit {job.rc} before the case started: {line}")
    elif errors:
        first = next((ln.strip() for ln in text.splitlines() if ln.startswith("=========")
                      and any(k in ln for k in ("Invalid", "Race", "Hazard", "Error", "error"))
                      and "ERROR SUMMARY" not in ln), "")
        r.update(status="failed", why=f"{errors} errors" + (f"; first: {first[:200]}" if first else ""))
    elif job.rc != 0 or "SANITIZE-CASE: ok" not in text:
        fail = next((ln for ln in text.splitlines() if "SANITIZE-CASE: FAIL" in ln or "Error" in ln), "")
        r.update(status="failed", why=f"exit {job.rc}" + (f": {fail.strip()[:250]}" if fail else ""))
    else:
        r.update(status="passed", why=("0 errors" if errors == 0 else "no ERROR SUMMARY line")
                 + (f", {race[-1][1]} racecheck warnings" if race and int(race[-1][1]) else ""))
    return r


def summarize_tests(xml_path: Path, progress: Path) -> dict:
    """Counts, failures (first lines), slowest tests, budget-skipped and still-running
    tests, from the JUnit report and the plugin's progress lines."""
    res = {"counts": "", "failures": [], "details": [], "budget_skipped": 0}
    starts, ends = {}, {}
    if progress.is_file():
        for ln in progress.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if rec.get("phase") == "start":
                starts[rec["nodeid"]] = rec
            else:
                ends[rec["nodeid"]] = rec
    passed = failed = errors = skipped = 0
    skip_reasons: Dict[str, int] = {}
    if xml_path.is_file():
        try:
            root = ET.parse(xml_path).getroot()
            for tc in root.iter("testcase"):
                nodeid = tc.get("classname", "").replace(".", "/") + ".py::" + tc.get("name", "")
                kids = {c.tag: c for c in tc}
                if "failure" in kids or "error" in kids:
                    el = kids.get("failure", kids.get("error"))
                    if "failure" in kids:
                        failed += 1
                    else:
                        errors += 1
                    res["failures"].append(f"{nodeid}: {first_line(el.get('message') or el.text)}")
                elif "skipped" in kids:
                    skipped += 1
                    msg = first_line(kids["skipped"].get("message"), 160)
                    if "gpu_check: time budget" in msg:
                        res["budget_skipped"] += 1
                    skip_reasons[msg] = skip_reasons.get(msg, 0) + 1
                else:
                    passed += 1
        except ET.ParseError as e:
            res["details"].append(f"pytest.xml does not parse: {e}")
        res["counts"] = (f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
                         + (f" ({res['budget_skipped']} not started: time budget)" if res["budget_skipped"] else ""))
    else:
        # no report (killed): count from the progress lines
        outcomes = [e.get("outcome") for e in ends.values()]
        res["counts"] = (f"no JUnit report (killed?); from the progress log: {outcomes.count('passed')} passed, "
                         f"{outcomes.count('failed')} failed, {outcomes.count('skipped')} skipped, "
                         f"{len(starts) - len(ends)} unfinished")
        res["failures"] = [f"{n}: failed (see pytest.log)" for n, e in ends.items() if e.get("outcome") == "failed"]
        res["budget_skipped"] = -1
    running = [n for n in starts if n not in ends]
    if running:
        res["details"].append("still running when the step ended: " + ", ".join(running[:10])
                              + (f" and {len(running) - 10} more" if len(running) > 10 else ""))
    timed = sorted(((e.get("seconds") or 0.0, n) for n, e in ends.items() if e.get("phase") == "call"),
                   reverse=True)
    if timed:
        total = sum(t for t, _ in timed)
        res["details"].append(f"test time (call phase, summed over workers): {total:.0f} s; slowest: "
                              + "; ".join(f"{n} {t:.1f} s" for t, n in timed[:12]))
        by_file: Dict[str, float] = {}
        for t, n in timed:
            f = n.split("::")[0]
            by_file[f] = by_file.get(f, 0.0) + t
        res["details"].append("per file: " + ", ".join(f"{f} {t:.0f} s" for f, t in
                                                      sorted(by_file.items(), key=lambda x: -x[1])))
    if skip_reasons:
        top = sorted(skip_reasons.items(), key=lambda x: -x[1])[:6]
        res["details"].append("skip reasons: " + "; ".join(f"{n} x {r}" for r, n in top))
    return res


def summarize_bench(json_path: Optional[Path], log_text: str) -> dict:
    res = {"counts": "", "failures": [], "details": [], "complete": False}
    if json_path is None or not json_path.is_file():
        res["counts"] = "no result file"
        res["failures"].append(first_line("\n".join(log_text.splitlines()[-5:])) or "no output")
        return res
    try:
        doc = json.loads(json_path.read_text())
    except ValueError as e:
        res["counts"] = f"{json_path.name} does not parse ({e})"
        return res
    rows = doc.get("rows", [])
    n_ok = sum(r.get("status") == "ok" for r in rows)
    bad = [r for r in rows if r.get("status") == "error"]
    n_skip = sum(r.get("status") == "skipped" for r in rows)
    res["complete"] = bool(doc.get("complete"))
    mm = (doc.get("matmul") or {}).get("tflops")
    res["counts"] = (f"{len(rows)} rows: {n_ok} ok, {len(bad)} failed, {n_skip} skipped"
                     + ("" if res["complete"] else " (PARTIAL)")
                     + (f"; matmul {mm:.0f} TFLOP/s" if isinstance(mm, (int, float)) else ""))
    mine = [r for r in bad if str(r.get("method", "")).split("-")[0] == "posattn"]   # and its variants
    res["failures"] = [f"{r['id']}: {r.get('note', '')[:200]}" for r in mine]
    peers = [r for r in bad if r not in mine]
    if peers:
        res["details"].append(f"{len(peers)} peer rows failed: " + "; ".join(
            f"{r['id']}: {r.get('note', '')[:120]}" for r in peers[:5]) + (" ..." if len(peers) > 5 else ""))
    for s in doc.get("summary", [])[:40]:
        if s.get("posattn_ms") is not None:
            sp = s.get("speedup_vs_best")
            res["details"].append(f"{s['group']}: posattn {s['posattn_ms']:.3g} ms, "
                                  f"{(s.get('posattn_tflops') or 0):.0f} TFLOP/s"
                                  + (f"; best peer {s.get('best_peer')} ms / posattn ms = {sp:.2f}" if sp else ""))
    res["details"].append(f"result: {json_path.name} (+ .md, .png)")
    return res


def tidy_run_dir(check: Check):
    """At most MAX_FILES plain-named files, no sub-folders; the summary says what is there."""
    d = check.run_dir
    for tmp in d.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    files = sorted(p for p in d.iterdir())
    problems = [p.name for p in files if not p.is_file() or not PLAIN_NAME_RE.match(p.name)]
    check.meta["files"] = [p.name for p in files]
    if len(files) + (0 if (d / "summary.md").exists() else 1) > MAX_FILES or problems:
        check.meta["files_problem"] = (f"{len(files)} entries (limit {MAX_FILES})"
                                       + (f"; not plain files / names: {problems}" if problems else ""))


def make_shim() -> Path:
    """WORK/shim/posattn: symlinks to posattn/*, kernels/ as posattn/kernels, csrc/ as
    posattn/csrc -- the installed layout, for PYTHONPATH when pip cannot install."""
    shim = WORK / "shim"
    pkg = shim / "posattn"
    pkg.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in (REPO / "posattn").iterdir() if p.name != "__pycache__"}
    links.update(kernels=REPO / "kernels", csrc=REPO / "csrc")
    for name, target in links.items():
        link = pkg / name
        if link.is_symlink() or link.exists():
            continue
        link.symlink_to(target)
    return shim


# ============================================================================= summary.md

def render_summary(check: Check, final: bool) -> str:
    m = check.meta
    p = m.get("probe", {}) or {}
    steps = [check.steps[s] for s in STEPS if s in check.steps]
    if final and all(s["status"] in OK_STATUSES or s["status"].startswith("skipped (--") for s in steps):
        verdict = "PASSED"
    elif final:
        verdict = "FAILED"
    else:
        verdict = "RUNNING (rewritten after every step)"
    dev = p.get("device") or m.get("smi_name") or "?"
    lines = [f"# posattn GPU check: {dev} -- {verdict}", ""]
    commit = str(m.get("commit", "?"))
    dirty = m.get("dirty")
    if dirty:
        commit += f" + uncommitted changes ({', '.join(m.get('dirty_files', [])[:8])})"
    elif dirty is False:
        commit += " (clean)"
    rows = [
        ("device", f"{dev}" + (f", sm_{p['capability'].replace('.', '')}" if p.get("capability") else "")
         + (f", {p['memory_gib']} GiB" if p.get("memory_gib") else "") + (f", {p['device_count']} visible"
                                                                          if p.get("device_count") else "")),
        ("driver", str(m.get("driver", "?"))),
        ("torch", f"{p.get('torch', '?')} (CUDA {p.get('cuda', '?')}, cuDNN {p.get('cudnn', '?')})"),
        ("triton", str(p.get("triton", "?"))),
        ("nvcc", str(p.get("nvcc", "?"))),
        ("python", f"{p.get('python', '?')} ({check.py})"),
        ("pytest / xdist", f"{p.get('pytest', '?')} / {p.get('xdist') or 'not importable'}"),
        ("compute-sanitizer", str(p.get("compute_sanitizer") or "not found")),
        ("commit", f"{commit} [{m.get('commit_source', '')}]"),
        ("posattn", f"{m.get('install', '?')}; {p.get('posattn_file', '')}"),
        ("started", f"{check.started_utc}; budget {TOTAL_BUDGET_S} s"
         + (f"; took {m['elapsed']:.0f} s" if m.get("elapsed") else "")),
        ("command", quote([Path(check.py).name, "bench/gpu_check.py", *sys.argv[1:]])),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows] + [""]
    lines += ["## Steps", "", "| step | status | wall s | limit s | counts |", "|---|---|---|---|---|"]
    for s in steps:
        wall = "-" if s.get("wall") is None else f"{s['wall']:.0f}"
        lim = "-" if s.get("timeout") is None else str(s["timeout"])
        lines.append(f"| {s['name']} | {s['status']} | {wall} | {lim} | {str(s.get('counts', '')).replace('|', '/')} |")
    lines.append("")
    for s in steps:
        body = []
        if s.get("command"):
            body.append(f"- command: `{s['command']}`")
        body += [f"- {n}" for n in s.get("notes", [])]
        body += [f"- {d}" for d in s.get("details", [])]
        fails = s.get("failures", [])
        if fails:
            body.append(f"- failures ({len(fails)}):")
            body += [f"  - {f}" for f in fails[:40]]
            if len(fails) > 40:
                body.append(f"  - ... and {len(fails) - 40} more (see pytest.log / pytest.xml)")
        if body:
            lines += [f"### {s['name']}", ""] + body + [""]
    if m.get("files"):
        lines += ["## Files", "", ", ".join(m["files"]) + (f" -- {m['files_problem']}" if m.get("files_problem")
                                                            else ""), ""]
    return "\n".join(lines)


# ============================================================================= modes run on the GPU machine

def probe() -> int:
    """Print one GPU_CHECK_PROBE line of JSON: versions, device, tools."""
    import importlib
    from importlib import metadata
    info: Dict[str, object] = {"python": sys.version.split()[0]}

    def version(dist):
        try:
            return metadata.version(dist)
        except Exception:
            return None

    info.update(pytest=version("pytest"), hypothesis=version("hypothesis"),
                transformers=version("transformers"), matplotlib=version("matplotlib"))
    try:
        importlib.import_module("xdist")
        info["xdist"] = version("pytest-xdist") or "importable"
    except Exception:
        info["xdist"] = None
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                        capability="%d.%d" % torch.cuda.get_device_capability(0),
                        memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
        from torch.utils import cpp_extension
        info["cuda_home"] = cpp_extension.CUDA_HOME
        info["ninja"] = bool(cpp_extension.is_ninja_available())
    except Exception as e:
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"not importable ({type(e).__name__}: {e})"
    home = info.get("cuda_home")
    nvcc = shutil.which("nvcc") or (str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").is_file()
                                    else None)
    if nvcc:
        rc, out = quick([nvcc, "--version"])
        info["nvcc"] = first_line(out.strip().splitlines()[-2] if rc == 0 and len(out.strip().splitlines()) > 1
                                  else out)
    cs = shutil.which("compute-sanitizer")
    for base in (home, "/usr/local/cuda"):
        if not cs and base and (Path(base) / "bin" / "compute-sanitizer").is_file():
            cs = str(Path(base) / "bin" / "compute-sanitizer")
    info["compute_sanitizer"] = cs
    try:
        import posattn
        import posattn.kernels.attention  # noqa: F401
        info.update(posattn_ok=True, posattn_file=str(Path(posattn.__file__).resolve().parent))
    except Exception as e:
        info.update(posattn_ok=False, posattn_error=f"{type(e).__name__}: {e}")
    print("GPU_CHECK_PROBE " + json.dumps(info), flush=True)
    return 0


def build_cuda() -> int:
    """Build (or load) the CUDA fallback the way the tests will: posattn._cuda.load_error()."""
    t0 = time.monotonic()
    from posattn import _cuda
    why = _cuda.load_error()
    if why is not None:
        print(f"GPU_CHECK_BUILD failed after {time.monotonic() - t0:.0f} s: {why}", flush=True)
        return 1
    print(f"GPU_CHECK_BUILD ok in {time.monotonic() - t0:.0f} s ({_cuda.build_dir()})", flush=True)
    return 0


# ============================================================================= dry run

def dry_run(check: Check) -> int:
    out = check.out_parent
    run_dir = f"{rel(out)}/gpu_<device>_<YYYY-MM-DD>/"
    print("posattn GPU check -- DRY RUN: nothing is installed, built or run")
    print(f"repo {REPO}; python {check.py}; results in {run_dir} (<= {MAX_FILES} files)")
    print(f"whole run <= {TOTAL_BUDGET_S} s; each timeout is capped so that the later steps keep "
          f"their floors {FLOOR_S}; steps: {', '.join(check.steps_wanted)}")
    print("environment of every step: TRITON_INTERPRET and POSATTN_BACKEND removed; TRITON_CACHE_DIR, "
          f"TORCHINDUCTOR_CACHE_DIR, POSATTN_CUDA_BUILD_DIR under {rel(WORK)}/; TORCH_CUDA_ARCH_LIST = the "
          "GPU's capability; HF offline")
    print()
    pip = [check.py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    print(f"[1] install     limit {PIP_TIMEOUT_S} s (pip) + {PROBE_TIMEOUT_S} s (probe)")
    print(f"      {quote(pip)}   (FORCE_CUDA, TORCH_CUDA_ARCH_LIST unset; retried with "
          "--break-system-packages, then --user; else a PYTHONPATH shim)")
    print(f"      {quote([check.py, 'bench/gpu_check.py', '--probe'])}   (device, driver, torch, triton, CUDA, "
          "cuDNN, nvcc, xdist, compute-sanitizer); git rev-parse HEAD + git status (or --commit)")
    print(f"[2] cuda-build  limit {CUDA_BUILD_TIMEOUT_S} s, in the background during [3]")
    print(f"      {quote([check.py, 'bench/gpu_check.py', '--build-cuda'])}   (ninja JIT into "
          f"{rel(WORK / 'cuda-jit')}; without ninja: FORCE_CUDA=1 {check.py} setup.py build_ext --inplace)")
    print(f"      workers wait for it before: {', '.join(WAIT_FOR_CUDA_BUILD)}")
    print(f"[3] tests       limit {TESTS_TIMEOUT_S} s (no test starts in the last {TESTS_LAST_START_S} s; "
          f"SIGINT {TESTS_INTERRUPT_S} s before the kill)")
    print(f"      {quote(check.pytest_cmd(XDIST_WORKERS))}")
    print(f"      (-n = min({XDIST_WORKERS}, cores), dropped with a note when xdist is not importable; "
          "TORCHINDUCTOR_COMPILE_THREADS=1; bench/ on PYTHONPATH for the plugin)")
    print(f"[4] sanitizer   limit {2 * max(SANITIZER_TIMEOUT_S.values())} s: memcheck, then racecheck; "
          f"the backends in parallel ({SANITIZER_TIMEOUT_S} s each); PYTORCH_NO_CUDA_MEMORY_CACHING=1")
    for tname in SANITIZER_TOOLS:
        for backend in SANITIZER_BACKENDS:
            print(f"      {quote(sanitizer_cmd('compute-sanitizer', tname, check.py, backend))}")
    bench_to = min(BENCH_TIMEOUT_S, TOTAL_BUDGET_S)
    print(f"[5] bench       limit what is left, at most {BENCH_TIMEOUT_S} s")
    print(f"      {quote(check.bench_cmd(bench_to))}   (--commit <sha> when given)")
    try:
        sys.path.insert(0, str(HERE))
        import harness
        qp = harness.quick_protocol()
        planned = harness.plan(qp)
        print(f"      quick protocol: {len(planned)} rows in {len(harness.groups(planned))} groups, (D, N) in "
              f"{qp.dn_pairs()}, causal only: {list(qp.causal_only)}")
    except Exception as e:
        print(f"      (bench/harness.py: {type(e).__name__}: {e})")
    print(f"[6] summary     {run_dir}summary.md after every step; steps.log, pytest.log, pytest.xml, sanitizer.log, "
          "<gpu>_<date>_quick.md/.json/.png")
    print()
    rc, head = quick(["git", "rev-parse", "HEAD"], timeout=5)
    if rc == 0 and head.strip():
        print(f"this checkout: {head.strip()}; where the GPU machine's copy has no .git, run "
              f"make gpu GPU_COMMIT={head.strip()} GPU_OUT=<dir> there")
    problems = check_selection(check.selection) + check_scripts()
    n_ids = sum("::" in s for s in check.selection)
    if problems:
        print(f"CHECK FAILED: {len(problems)} problems")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"checked: {len(check.selection)} pytest arguments ({n_ids} node ids, their functions and parametrized "
          f"ids parsed with ast) and {len(SCRIPTS)} scripts / sources exist; bench/run.py has "
          f"{', '.join(RUN_PY_OPTIONS)}: all exist")
    return 0


# ============================================================================= main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="posattn's GPU check (make gpu): install, tests, compute-sanitizer, "
                                             "quick benchmark, one summary.", epilog="See the module docstring.")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check that what it names exists")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="parent folder of the run folder gpu_<device>_<date>/ (default bench/results)")
    ap.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    ap.add_argument("--select", action="append", default=None, metavar="PYTEST_ARG",
                    help="replace TEST_SELECTION (repeatable): a file, file::test or file::test[id]")
    ap.add_argument("--steps", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                    help=f"comma-separated subset of {','.join(STEPS)} (the probe always runs)")
    ap.add_argument("--allow-no-gpu", action="store_true",
                    help="go on when torch sees no GPU (to try the kit itself on a CPU machine)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-cuda", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps:
        bad = [s for s in args.steps if s not in STEPS]
        if bad:
            ap.error(f"--steps: unknown {bad}; choose from {STEPS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe()
    if args.build_cuda:
        return build_cuda()
    check = Check(args)
    if args.dry_run:
        return dry_run(check)
    problems = check_selection(check.selection) + check_scripts()
    if problems:
        print("gpu_check: the plan names things that do not exist (run with --dry-run):\n  - "
              + "\n  - ".join(problems), file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
