#!/usr/bin/env python3
"""Static, CPU-only performance proxy for Triton kernels on sm_90 (H100/H200).

For one kernel + launch it
  1. compiles with triton.compile(ASTSource(fn, signature, constexprs, attrs),
     target=GPUTarget("cuda", 90, 32), options) -- no GPU needed;
  2. re-runs Triton's own ptxas (-lineinfo -v --gpu-name=sm_90a, exactly the
     command Triton's make_cubin uses) on compiled.asm["ptx"] to read registers,
     spill stores/loads and stack, and checks the cubin it writes is identical to
     compiled.asm["cubin"]; shared memory is Triton's metadata.shared (dynamic);
  3. disassembles compiled.asm["cubin"] with nvdisasm, builds the control-flow
     graph, finds the natural loops (back edges whose target dominates the
     source), and counts, per iteration of each loop (own blocks, nested loops
     reported separately), the instructions by class;
  4. estimates a throughput lower bound per loop iteration per CTA:
       mma   = FLOPs of the iteration's HGMMA/HMMA / MMA_FLOP_PER_CLK_SM
       mufu  = MUFU warp-instructions * 32 lanes / 16 lanes per clock per SM
       issue = warp-instructions of all warps of the CTA / 4 schedulers
     cycles = max(mma, mufu, issue). This is a proxy, not a timing: latency,
     overlap between CTAs, memory bandwidth, L2, bank conflicts, barrier stalls
     and the dependence of HGMMA on its operands' arrival are not modelled.

MMA_FLOP_PER_CLK_SM = 4096: H100 SXM dense BF16/FP16 tensor peak 989.4 TFLOP/s
= 132 SMs * 1.83 GHz * 4096 FLOP/clk/SM (2048 FMA/clk/SM, twice A100's 1024
FMA/clk/SM). HMMA (mma.sync) on Hopper is assumed to reach half of that (an
assumption, flagged wherever an HMMA is found).

Posattn launches are captured from posattn's own host code (posattn/_triton.py:
_forward/_backward with CPU tensors and a capturing `wrap`) and specialised the
way Triton's JIT specialises a real launch (16-byte aligned pointers, ints
divisible by 16 -> tt.divisibility=16, ints equal to 1 -> constexpr), using
Triton's own binder. `--aot` instead uses the signature logic copied from
posattn/tests/aot_compile.py (no specialisation), for comparison.

Usage (see report-2026-11-29.md for the exact commands):
    python sass_model.py --suite posattn  --out DIR   [--aot] [--only SUBSTR]
    python sass_model.py --suite tutorial --out DIR --tutorial PATH_TO_06-fused-attention.py
    python sass_model.py --table DIR/*.json > table.md
"""
from __future__ import annotations

import argparse
import collections
import glob
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ARCH = 90
MMA_FLOP_PER_CLK_SM = {"HGMMA": 4096, "HMMA": 2048}
MUFU_LANES_PER_CLK_SM = 16
SCHEDULERS = 4
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 233472          # 228 KiB on H100/H200
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KiB per CTA on sm_80+


def triton_bin(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ----------------------------------------------------------------------------- compile

def compile_src(fn, signature, constexprs, attrs, options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t = time.time()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                       options=options)
    return k, time.time() - t


def jit_specialise(kernel, args, kwargs):
    """What JITFunction.run would hand to triton.compile for this launch, without a
    driver: Triton's own binder (native_specialize_impl) on the real host values."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = kernel
    while not hasattr(fn, "params"):  # Autotuner / Heuristics wrappers
        fn = fn.fn
    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    kwargs = dict(kwargs, debug=False, instrumentation_mode="")
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return fn, signature, constexprs, attrs, options.__dict__


def ptxas_info(ptx, cubin, ptxas=None):
    """Run ptxas -v on Triton's PTX the way Triton's make_cubin does."""
    ptxas = ptxas or triton_bin("ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        out = os.path.join(d, "k.cubin")
        open(src, "w").write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{ARCH}a", src, "-o", out],
                           capture_output=True, text=True)
        log = r.stdout + r.stderr
        alt = triton_bin("ptxas-blackwell")
        if "Unsupported .version" in log and os.path.exists(alt):
            # Triton >= 3.9 writes PTX newer than its ptxas reads; it assembles with this one
            ptxas = alt
            r = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{ARCH}a", src, "-o", out],
                               capture_output=True, text=True)
            log = r.stdout + r.stderr
        mine = open(out, "rb").read() if os.path.exists(out) else b""
        # the instructions must match Triton's cubin (ELF bytes may differ, e.g. a cached build)
        same = bool(mine) and (mine == cubin or disassemble(mine) == disassemble(cubin))
    info = dict(ptxas=ptxas, log=log.strip(), cubin_identical=same)
    m = re.search(r"Used (\d+) registers", log)
    info["regs"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    info["stack"], info["spill_stores"], info["spill_loads"] = (int(x) for x in m.groups()) if m else (None,) * 3
    m = re.search(r"used (\d+) barriers", log)
    info["barriers"] = int(m.group(1)) if m else 0
    return info


def disassemble(cubin):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        open(p, "wb").write(cubin)
        r = subprocess.run([triton_bin("nvdisasm"), "-c", "-novliw", p], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return r.stdout


# ----------------------------------------------------------------------------- SASS parsing

INST_RE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?(\S+)\s*(.*?)\s*;\s*$")
LABEL_RE = re.compile(r"^\s*(\.L_x_\d+|[A-Za-z_$][\w$.]*):\s*$")


class Inst:
    __slots__ = ("addr", "pred", "op", "args", "target", "line")

    def __init__(self, addr, pred, op, args, line):
        self.addr, self.pred, self.op, self.args, self.line = addr, pred, op, args, line
        m = re.search(r"`\(([^)]+)\)", args)
        self.target = m.group(1) if m else None

    @property
    def base(self):
        return self.op.split(".")[0]


def parse_sass(text):
    insts, labels, pending = [], {}, []
    for line in text.splitlines():
        m = INST_RE.match(line)
        if m:
            ins = Inst(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4), line.strip())
            for lab in pending:
                labels[lab] = ins.addr
            pending = []
            insts.append(ins)
            continue
        m = LABEL_RE.match(line)
        if m:
            pending.append(m.group(1))
    return insts, labels


# ----------------------------------------------------------------------------- classes

CLASSES = ["mma", "mufu", "fp", "int", "cvt", "gmem", "smem", "tma", "local", "shfl", "sync", "pred", "other"]
CLASS_TITLES = dict(mma="MMA", mufu="MUFU", fp="FP32/FP16x2 arith", int="int/address (incl. uniform)",
                    cvt="conversions", gmem="global ld/st", smem="shared ld/st (LDS/STS/LDSM/STSM)",
                    tma="async copy / TMA", local="local (spill) LDL/STL", shfl="SHFL", sync="barriers/syncs",
                    pred="predicates/selects", other="other (moves, control, const loads)")
_C = {}
for cls, ops in dict(
        mma="HGMMA HMMA IMMA DMMA QGMMA IGMMA BGMMA OMMA",
        mufu="MUFU",
        fp="FADD FMUL FFMA FMNMX FADD32I FMUL32I FFMA32I FCHK FSWZADD HADD2 HMUL2 HFMA2 HMNMX2 FMNMX3 FADD2 FMUL2 FFMA2",
        int="IMAD IADD3 IADD LEA LOP3 LOP SHF SHL SHR IMNMX VIMNMX VIADD VIADDMNMX IABS SGXT BMSK POPC FLO BREV IDP "
            "IMUL ISCADD XMAD IMAD32I IADD32I LOP32I UIADD3 UIMAD ULEA ULOP3 USHF UIMNMX USGXT UPOPC UFLO UBMSK "
            "UBREV ULOP UIADD3.64 UIMAD.WIDE UVIADD UVIMNMX",
        cvt="F2F F2FP I2F F2I I2I I2FP F2IP FRND I2F.U16 UF2FP UI2F",
        gmem="LDG STG LD ST RED ATOM ATOMG REDG",
        smem="LDS STS LDSM STSM ATOMS REDS",
        tma="LDGSTS LDGDEPBAR UTMALDG UTMASTG UTMAPF UBLKCP UTMACCTL UTMACMDFLUSH UBLKRED UBLKPF UTMAREDG",
        local="LDL STL",
        shfl="SHFL",
        sync="BAR BSYNC BSSY WARPSYNC DEPBAR WARPGROUP MEMBAR FENCE SYNCS ERRBAR CCTL ARRIVES NANOSLEEP CGAERRBAR "
             "UCGABAR_ARV UCGABAR_WAIT USETMAXREG ELECT",
        pred="ISETP FSETP PSETP PLOP3 SEL FSEL P2R R2P VOTE VOTEU HSETP2 DSETP UISETP UPLOP3 UPSETP USEL FSET ISET "
             "HSET2 UP2UR",
).items():
    for op in ops.split():
        _C[op] = cls


def classify(ins):
    if ins.op.startswith("HFMA2.MMA"):
        return "other"  # a register move idiom, not a tensor-core op
    return _C.get(ins.base, "other")


MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")
HMMA_SHAPE = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}


def mma_flops(ins):
    """(kind, shape string, FLOPs per instruction per issuing unit: warpgroup for
    HGMMA, warp for HMMA)."""
    if ins.base in ("HGMMA", "QGMMA", "IGMMA", "BGMMA"):
        m = MMA_SHAPE.search(ins.op)
        M, N, K = (int(x) for x in m.groups())
        return "HGMMA", f"{M}x{N}x{K}", 2 * M * N * K
    if ins.base in ("HMMA", "IMMA"):
        key = ins.op.split(".")[1]
        M, N, K = HMMA_SHAPE.get(key, (16, 8, 16))
        return "HMMA", f"m{M}n{N}k{K}", 2 * M * N * K
    return None


def mem_width(ins):
    for suf, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suf in ins.op:
            return b
    return 4


# ----------------------------------------------------------------------------- CFG and loops

def build_cfg(insts, labels):
    addr_idx = {ins.addr: i for i, ins in enumerate(insts)}
    leaders = {0}
    for i, ins in enumerate(insts):
        if ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL") and i + 1 < len(insts):
            leaders.add(i + 1)
        if ins.base in ("BRA", "JMP", "CALL") and ins.target in labels:
            leaders.add(addr_idx[labels[ins.target]])
    leaders = sorted(leaders)
    blocks = []
    for j, s in enumerate(leaders):
        e = leaders[j + 1] if j + 1 < len(leaders) else len(insts)
        blocks.append((s, e))
    start_block = {s: b for b, (s, e) in enumerate(blocks)}
    succ = [set() for _ in blocks]
    calls = [None] * len(blocks)
    for b, (s, e) in enumerate(blocks):
        last = insts[e - 1]
        fall = b + 1 if b + 1 < len(blocks) else None
        tgt = start_block.get(addr_idx.get(labels.get(last.target, -1), -1)) if last.target else None
        if last.base in ("BRA", "JMP"):
            if tgt is not None:
                succ[b].add(tgt)
            if last.pred and fall is not None:
                succ[b].add(fall)
        elif last.base in ("EXIT", "RET"):
            if last.pred and fall is not None:
                succ[b].add(fall)
        elif last.base in ("BRX", "JMX"):
            pass  # indirect: unknown targets
        else:
            if last.base == "CALL":
                calls[b] = tgt
            if fall is not None:
                succ[b].add(fall)
    return blocks, succ, calls


def dominators(n, succ, entry=0):
    pred = [set() for _ in range(n)]
    for b in range(n):
        for s in succ[b]:
            pred[s].add(b)
    # reachable set
    reach, stack = {entry}, [entry]
    while stack:
        b = stack.pop()
        for s in succ[b]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    dom = {b: set(reach) for b in reach}
    dom[entry] = {entry}
    changed = True
    order = sorted(reach)
    while changed:
        changed = False
        for b in order:
            if b == entry:
                continue
            ps = [dom[p] for p in pred[b] if p in reach]
            new = set.intersection(*ps) if ps else set()
            new = new | {b}
            if new != dom[b]:
                dom[b] = new
                changed = True
    return dom, pred


def find_loops(blocks, succ, dom, pred):
    """Natural loops: {header: dict(body=set, latches=set)}; plus backward branches
    that are not natural (irreducible) under 'irreducible'."""
    loops, irreducible = {}, []
    for u in range(len(blocks)):
        for h in succ[u]:
            if blocks[h][0] <= blocks[u][0]:
                if u in dom and h in dom[u]:
                    body, stack = {h, u}, ([u] if u != h else [])
                    while stack:
                        x = stack.pop()
                        for p in pred[x]:
                            if p not in body:
                                body.add(p)
                                stack.append(p)
                    L = loops.setdefault(h, dict(body=set(), latches=set()))
                    L["body"] |= body
                    L["latches"].add(u)
                else:
                    irreducible.append((u, h))
    return loops, irreducible


def count(insts_list, num_warps_unit=None):
    c = collections.Counter()
    mufu, mma_shapes, mem = collections.Counter(), collections.Counter(), collections.Counter()
    flops = collections.Counter()
    for ins in insts_list:
        cls = classify(ins)
        c[cls] += 1
        if cls == "mufu":
            mufu[ins.op.split(".")[1] if "." in ins.op else ins.op] += 1
        elif cls == "mma":
            kind, shape, f = mma_flops(ins)
            mma_shapes[f"{kind}.{shape}"] += 1
            flops[kind] += f
        elif cls in ("gmem", "smem", "tma", "local"):
            mem[f"{ins.base}{'' if cls == 'tma' else '.' + str(mem_width(ins) * 8)}"] += 1
    c["total"] = len(insts_list)
    return dict(classes=dict(c), mufu=dict(mufu), mma=dict(mma_shapes), mma_flops=dict(flops), mem=dict(mem))


def analyse_sass(text):
    insts, labels = parse_sass(text)
    blocks, succ, calls = build_cfg(insts, labels)
    dom, pred = dominators(len(blocks), succ)
    loops, irreducible = find_loops(blocks, succ, dom, pred)
    # nesting
    heads = sorted(loops, key=lambda h: len(loops[h]["body"]))
    for h in heads:
        L = loops[h]
        L["inner"] = [g for g in heads if g != h and g in L["body"] and loops[g]["body"] <= L["body"]]
        L["parent"] = None
    for h in heads:  # smallest enclosing loop is the parent
        encl = [g for g in heads if g != h and h in loops[g]["inner"]]
        if encl:
            loops[h]["parent"] = min(encl, key=lambda g: len(loops[g]["body"]))
    out = []
    for h in sorted(loops, key=lambda h: blocks[h][0]):
        L = loops[h]
        direct_inner = [g for g in L["inner"] if loops[g]["parent"] == h]
        inner_blocks = set().union(*(loops[g]["body"] for g in L["inner"])) if L["inner"] else set()
        own = sorted(L["body"] - inner_blocks)
        always = [b for b in own if all(b in dom[l] for l in L["latches"])]
        own_insts = [insts[i] for b in own for i in range(*blocks[b])]
        always_insts = [insts[i] for b in always for i in range(*blocks[b])]
        callees = sorted({calls[b] for b in own if calls[b] is not None})
        exits = sorted({s for b in own for s in succ[b] if s not in L["body"]})
        depth, p = 0, L["parent"]
        while p is not None:
            depth, p = depth + 1, loops[p]["parent"]
        rec = dict(header=f"{insts[blocks[h][0]].addr:#06x}",
                   span=[f"{min(insts[blocks[b][0]].addr for b in L['body']):#06x}",
                         f"{max(insts[blocks[b][1] - 1].addr for b in L['body']):#06x}"],
                   depth=depth, parent=(f"{insts[blocks[L['parent']][0]].addr:#06x}" if L["parent"] is not None
                                        else None),
                   inner=[f"{insts[blocks[g][0]].addr:#06x}" for g in direct_inner],
                   blocks=len(own), cond_blocks=len(own) - len(always), exits=len(exits),
                   calls=[f"{insts[blocks[c][0]].addr:#06x}" for c in callees],
                   own=count(own_insts), always=count(always_insts))
        # instructions inside the loop's own blocks of the called subroutines
        if callees:
            sub = []
            for c in callees:
                b = c
                while b < len(blocks):
                    sub += [insts[i] for i in range(*blocks[b])]
                    if insts[blocks[b][1] - 1].base == "RET":
                        break
                    b += 1
            rec["callee"] = count(sub)
        out.append(rec)
    return dict(n_insts=len(insts), n_blocks=len(blocks), loops=out,
                irreducible=[(f"{insts[blocks[u][0]].addr:#06x}", f"{insts[blocks[h][0]].addr:#06x}")
                             for u, h in irreducible],
                whole=count(insts))


# ----------------------------------------------------------------------------- model

def occupancy(regs, shared, num_warps):
    regs_t = max(8, math.ceil(regs / 8) * 8)
    per_warp = math.ceil(regs_t * 32 / 256) * 256
    warps_by_regs = REGS_PER_SM // per_warp
    by_regs = warps_by_regs // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM // num_warps
    ctas = min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM)
    limiter = min((by_regs, "regs"), (by_smem, "smem"), (by_warps, "warps"))[1]
    return ctas, limiter


def loop_model(loop, num_warps, tile, which="always"):
    """Throughput lower bound, in SM cycles, of one iteration of one CTA's loop.
    which='always': the blocks executed on every iteration (they dominate the back
    edge); conditional blocks (e.g. libdevice's sin/cos slow path, branches to
    mbarrier waits) are left out and reported as static 'own' counts."""
    c = loop[which]
    total = c["classes"].get("total", 0)
    mufu = c["classes"].get("mufu", 0)
    units_wg = num_warps / 4
    mma_cyc = 0.0
    for kind, f in c["mma_flops"].items():
        per_cta = f * (units_wg if kind == "HGMMA" else num_warps)
        mma_cyc += per_cta / MMA_FLOP_PER_CLK_SM[kind]
    mufu_cyc = mufu * num_warps * 32 / MUFU_LANES_PER_CLK_SM
    issue_cyc = total * num_warps / SCHEDULERS
    cyc = max(mma_cyc, mufu_cyc, issue_cyc)
    bound = "MMA" if cyc == mma_cyc else "MUFU" if cyc == mufu_cyc else "issue"
    per128 = cyc * (128 * 128) / (tile[0] * tile[1]) if tile else None
    flops = sum(f * (units_wg if k == "HGMMA" else num_warps) for k, f in c["mma_flops"].items())
    return dict(mma_cyc=round(mma_cyc, 1), mufu_cyc=round(mufu_cyc, 1), issue_cyc=round(issue_cyc, 1),
                cycles=round(cyc, 1), bound=bound, cycles_per_128x128=round(per128, 1) if per128 else None,
                flops_per_iter=flops, mma_util_bound=round(mma_cyc / cyc, 3) if cyc else None)


def analyse_compiled(k, name, meta, outdir=None, extra_ptxas=None):
    ptx, cubin = k.asm["ptx"], k.asm["cubin"]
    info = ptxas_info(ptx, cubin)
    sass = disassemble(cubin)
    if outdir:
        base = os.path.join(outdir, name)
        open(base + ".sass", "w").write(sass)
        open(base + ".ptx", "w").write(ptx)
        open(base + ".ttgir", "w").write(k.asm.get("ttgir", ""))
    an = analyse_sass(sass)
    md = k.metadata
    num_warps = md.num_warps
    ttgir = k.asm.get("ttgir", "")
    ws = None
    if "ttg.warp_specialize" in ttgir:  # default partition + worker partitions, each its own warps
        m = re.search(r'"ttg.num-warps" = (\d+)', ttgir)
        ws = dict(default_warps=int(m.group(1)) if m else None,
                  partition_warps=[int(x) for x in re.findall(r"^\s*partition\d+\(.*num_warps\((\d+)\)", ttgir,
                                                              re.M)])
    shared = md.shared
    ctas, limiter = occupancy(info["regs"], shared, num_warps)
    rec = dict(name=name, **meta, num_warps=num_warps, num_stages=md.num_stages, shared=shared,
               global_scratch=getattr(md, "global_scratch_size", 0), ptxas=info, ctas_per_sm=ctas,
               occupancy_limiter=limiter, warp_specialized=ws, sass=dict(n_insts=an["n_insts"], irreducible=an["irreducible"],
                                                    whole=an["whole"]),
               loops=an["loops"])
    if extra_ptxas:
        rec["ptxas_alt"] = {k2: v for k2, v in ptxas_info(ptx, b"", extra_ptxas).items() if k2 != "cubin_identical"}
    tile = meta.get("tile")
    for L in rec["loops"]:
        L["wait_spin"] = is_wait_spin(L)
        L["warps"] = num_warps
        L["model"] = loop_model(L, num_warps, tile)
    if ws:
        ws_assign(rec)
    return rec


def is_wait_spin(L):
    """An mbarrier try-wait spin loop (SYNCS.PHASECHK + branch): runs only while waiting."""
    c = L["own"]["classes"]
    return c.get("total", 0) <= 6 and c.get("sync", 0) >= 1 and not c.get("mma")


def ws_assign(rec):
    """Warp-specialised kernel: each loop runs on one partition's warps. Loops with
    MMAs are the consumer partitions (in address order, one per worker partition);
    loops with TMA loads and no MMA are the producer (default partition). One CTA
    iteration (one K/V tile) is all of these together."""
    ws = rec["warp_specialized"]
    mma_loops = [L for L in rec["loops"] if L["own"]["classes"].get("mma")]
    encl = set()
    for L in mma_loops:  # loops enclosing the consumers (the workers' dispatch loop) are not producers
        p = L["parent"]
        while p is not None:
            encl.add(p)
            p = next(x["parent"] for x in rec["loops"] if x["header"] == p)
    prod = [L for L in rec["loops"] if not L["wait_spin"] and not L["own"]["classes"].get("mma")
            and L["own"]["classes"].get("tma") and L["header"] not in encl]
    pw = ws["partition_warps"]
    for i, L in enumerate(mma_loops):
        L["warps"] = pw[i] if i < len(pw) else ws["default_warps"]
        L["role"] = "consumer"
    for L in prod:
        L["warps"] = ws["default_warps"]
        L["role"] = "producer"
    group = mma_loops + prod
    tile = rec.get("tile")
    rec["ws_group"] = dict(loops=[L["header"] for L in group],
                           model=group_model([(L, L["warps"]) for L in group], tile))
    for L in group:
        L["model"] = loop_model(L, L["warps"], tile)


def group_model(members, tile):
    """Loops that run concurrently on different warps and together make one CTA iteration."""
    mma = mufu = issue = flops = 0.0
    for L, warps in members:
        m = loop_model(L, warps, None)
        mma += m["mma_cyc"]
        mufu += m["mufu_cyc"]
        issue += m["issue_cyc"]
        flops += m["flops_per_iter"]
    cyc = max(mma, mufu, issue)
    bound = "MMA" if cyc == mma else "MUFU" if cyc == mufu else "issue"
    per128 = cyc * 128 * 128 / (tile[0] * tile[1]) if tile else None
    return dict(mma_cyc=round(mma, 1), mufu_cyc=round(mufu, 1), issue_cyc=round(issue, 1), cycles=round(cyc, 1),
                bound=bound, cycles_per_128x128=round(per128, 1) if per128 else None, flops_per_iter=flops,
                mma_util_bound=round(mma / cyc, 3) if cyc else None)


# ----------------------------------------------------------------------------- posattn cases

NONE = dict(CAUSAL=False, HAS_WL=False, HAS_WR=False, HAS_POS=False, ROPE=False, ROT_DIM=0, INTERLEAVED=False,
            ALIBI=False, TABLE=0, BIAS=False, BIAS_MASK=False, REL_K=False, REL_V=False, REL_U=False,
            REL_W=False, UPCAST=False, SOFTCAP=False, SINKS=False, DROPOUT=False)
FWD_ENCODINGS = {
    "plain": {},
    "causal": dict(CAUSAL=True),
    "rope": dict(ROPE=True, ROT_DIM=-1),
    "alibi": dict(ALIBI=True),
    "table": dict(TABLE=1),
    "bias": dict(BIAS=True),
    "causal+rope": dict(CAUSAL=True, ROPE=True, ROT_DIM=-1),
    "causal+alibi": dict(CAUSAL=True, ALIBI=True),
    "causal+bias": dict(CAUSAL=True, BIAS=True),
    "causal+table": dict(CAUSAL=True, TABLE=1),
    "grid": dict(TABLE=2),   # GridBias, a 32 x 64 window (N = 2048 tokens)
    # a width that is not a power of two (51 x 40, N = 2040): the interior tiles' general
    # gather, an index per score (a power-of-two width reads at compile-time key offsets)
    "grid40": dict(TABLE=2, WINDOW=(51, 40)),
    # an odd width (DINOv2's 37 x 37 patches at 518 px, N = 1369): a line per query column
    "grid37": dict(TABLE=2, WINDOW=(37, 37)),
    # causal: the boundary (diagonal) tiles start q.k from the table's vectors too, masks after
    "causal+grid40": dict(CAUSAL=True, TABLE=2, WINDOW=(51, 40)),
    "causal+grid": dict(CAUSAL=True, TABLE=2),
    # Swin's window attention: 49 tokens of a 7 x 7 window, its shifted-window mask a
    # [1, 1, 49, 49] float bias (a row stride of 49); every tile is a boundary tile
    "swin": dict(TABLE=2, WINDOW=(7, 7), BIAS=True, BIAS_BATCH=1, BIAS_HEADS=1),
    "vit": dict(N=197),   # ViT-B/16 at 224 px: 196 patches and a class token
    "shaw-kv": dict(REL_K=True, REL_V=True),
    # causal Shaw: the masked loop's compares beside the slices (the AOT check's causal /
    # window Shaw problems spill there at D = 80 / 128)
    "causal+shaw-kv": dict(CAUSAL=True, REL_K=True, REL_V=True),
    # Transformer-XL: Shaw's tables with u and w (q + u against the keys, q + w against aK)
    "causal+shaw-xl": dict(CAUSAL=True, REL_K=True, REL_V=True, REL_U=True, REL_W=True),
    "softcap": dict(SOFTCAP=True),
    "causal+softcap+sinks": dict(CAUSAL=True, SOFTCAP=True, SINKS=True),
    "dropout": dict(DROPOUT=True),
    # decoding (_attn_decode + merge): one query of 32 heads against 32k keys of 8 k/v heads
    "decode": dict(DECODE=True),
    "decode+alibi+table": dict(DECODE=True, ALIBI=True, TABLE=1),
}
BWD_ENCODINGS = {"plain": ({}, {}), "rope": (dict(ROPE=True, ROT_DIM=-1), {}),
                 "alibi+dslope": (dict(ALIBI=True), dict(D_SLOPE=True)),
                 "table+dtable": (dict(TABLE=1), dict(D_TABLE=True)),
                 "grid+dgrid": (dict(TABLE=2), dict(D_TABLE=True)),   # GridBias, 32 x 64 window
                 # Swin-v2's 16 x 16 window (N = 256: T = 961 table columns, against 8001 above)
                 "grid16+dgrid": (dict(TABLE=2, WINDOW=(16, 16)), dict(D_TABLE=True)),
                 # Swin's 7 x 7 window (N = 49) and its [1, 1, 49, 49] mask, as fwd "swin"
                 "swin+dgrid": (dict(TABLE=2, WINDOW=(7, 7), BIAS=True, BIAS_BATCH=1, BIAS_HEADS=1),
                                dict(D_TABLE=True)),
                 # a per-sample dense bias (dS written by dK/dV) and one shared by the batch
                 # (dK/dV adds its dS atomically; torch's deterministic mode: a dBias pass)
                 "bias+dbias": (dict(BIAS=True), dict(D_BIAS=True)),
                 "bias[1,H]+dbias": (dict(BIAS=True, BIAS_BATCH=1), dict(D_BIAS=True)),
                 "shaw-kv+dak,dav": (dict(REL_K=True, REL_V=True), dict(D_AK=True, D_AV=True)),
                 # Transformer-XL: u and w too, with their gradients
                 "shaw-xl+dak,dav,du,dw": (dict(REL_K=True, REL_V=True, REL_U=True, REL_W=True),
                                           dict(D_AK=True, D_AV=True, D_U=True, D_W=True)),
                 "softcap": (dict(SOFTCAP=True), {}),
                 "sinks+dsinks": (dict(SINKS=True), dict(D_SINKS=True)),
                 "dropout": (dict(DROPOUT=True), {})}

# --- copied from posattn tests/aot_compile.py (signature building), used by --aot
POINTERS = set("Q K V Out Lse Lse2 Pos Params Table Bias Rel Rng DO DK DV DQ Stats DLse DParams DAK DAV DBias".split())
FLOAT_POINTERS = set("Lse Lse2 Stats DLse DParams DAK DAV DBias Params Table Rel".split())
FLOATS = {"sm_scale"}


def aot_signature(fn, cx, dt, flags):
    params = inspect.signature(fn.fn).parameters
    cx = {k: v for k, v in cx.items() if k in params}
    sig = {}
    for p, prm in params.items():
        if "constexpr" in str(prm.annotation):
            sig[p] = "constexpr"
        elif p in POINTERS:
            sig[p] = "*fp32" if p in FLOAT_POINTERS else ("*i64" if p in ("Pos", "Rng") else "*" + dt)
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
    if "Bias" in sig and flags.get("BIAS"):
        sig["Bias"] = "*i1" if flags.get("BIAS_MASK") else "*" + dt
    return sig, cx
# --- end of copy


# Representative problem for the launch-specialised mode (all sizes multiples of 16,
# MHA so GROUP == 1 as Triton specialises it).
PB, PH, PN = 2, 16, 2048
TABLE_L = TABLE_R = 128   # DistanceBias with 257 columns -> BLOCK_T = 512 in dq
SHAW_K = 64               # Shaw clip K
GRID = (32, 64)           # GridBias window of the "grid" variants (N = Wh * Ww = 2048 tokens)


def posattn_launches(enc, D, backward, bwd_grads=None):
    """Run posattn's own host launch code with CPU tensors and a capturing wrap;
    returns [(kernel, args, kwargs)] exactly as they would be launched on a GPU."""
    import torch
    from posattn import _triton as T
    from posattn import _validate
    from posattn.encodings import DistanceBias, GridBias, RelativeEmbeddings, RoPE
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(PB, PH, PN, D, dtype=dt)
    k = torch.randn(PB, PH, PN, D, dtype=dt)
    v = torch.randn(PB, PH, PN, D, dtype=dt)
    flags = dict(NONE, **enc)
    bias_batch = flags.pop("BIAS_BATCH", PB)
    bias_heads = flags.pop("BIAS_HEADS", PH)
    window = flags.pop("WINDOW", GRID)
    if flags["TABLE"] == 2:   # one window per batch row
        q, k, v = (x[:, :, :window[0] * window[1]] for x in (q, k, v))
    n = flags.pop("N", None)   # a short sequence (every tile a boundary tile)
    if n is not None:
        q, k, v = (x[:, :, :n] for x in (q, k, v))
    if flags.pop("DECODE", False):   # KV-cache decoding: B=1, Hq=32, Hkv=8, Nq=1, Nk=32k
        q = torch.randn(1, 32, 1, D, dtype=dt)
        k = torch.randn(1, 8, 32768, D, dtype=dt)
        v = torch.randn(1, 8, 32768, D, dtype=dt)
    kw = dict(causal=flags["CAUSAL"])
    table = alibi = bias = None
    if flags["ROPE"]:
        kw["rope"] = RoPE()
    H = q.shape[1]
    if flags["ALIBI"]:
        alibi = torch.rand(1, H, dtype=torch.float32)
        kw["alibi_slopes"] = alibi
    if flags["TABLE"] == 2:
        table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), H, dtype=torch.float32)
        kw["rel_bias"] = GridBias(table, window)
    elif flags["TABLE"]:
        table = torch.randn(H, TABLE_L + TABLE_R + 1, dtype=torch.float32)
        kw["rel_bias"] = DistanceBias(table, TABLE_L, TABLE_R)
    if flags["BIAS"]:
        bias = torch.randn(bias_batch if backward else 1, bias_heads, q.shape[2], k.shape[2], dtype=dt)
        kw["bias"] = bias
    rel = None
    if flags["REL_K"] or flags["REL_V"]:
        rel = RelativeEmbeddings(key=torch.randn(PH, 2 * SHAW_K + 1, D, dtype=dt) if flags["REL_K"] else None,
                                 value=torch.randn(PH, 2 * SHAW_K + 1, D, dtype=dt) if flags["REL_V"] else None,
                                 clip=SHAW_K,
                                 content_bias=torch.randn(PH, D) if flags["REL_U"] else None,
                                 position_bias=torch.randn(PH, D) if flags["REL_W"] else None)
        kw["rel_emb"] = rel
    if flags["SOFTCAP"]:
        kw["softcap"] = 50.0
    sinks = torch.randn(PH) if flags["SINKS"] else None
    kw["sinks"] = sinks
    if flags["DROPOUT"]:
        kw["dropout_p"] = 0.1
    p = _validate.check(q, k, v, **kw)
    if p.dropout_p > 0:
        p = p.replace(dropout_rng=torch.zeros(1, dtype=torch.int64))
    calls = []

    class Cap:
        def __init__(self, kern):
            self.kern = kern

        def __getitem__(self, grid):
            def launch(*a, **k2):
                calls.append((self.kern, a, k2))
            return launch

    re_ = p.rel_emb
    params = (p.alibi, p.rel_bias.table if p.rel_bias is not None else None, p.bias,
              re_.key if re_ else None, re_.value if re_ else None, re_.content_bias if re_ else None,
              re_.position_bias if re_ else None)
    L = T._Launch(p, q, *params, sinks=sinks)
    out, lse, lse2 = T._forward(L, q, k, v, wrap=Cap)
    if not backward:
        return calls
    calls.clear()
    L = T._Launch(p, q, *params, sinks=sinks, forward=False)   # as posattn/_op.py's backward builds it
    need = dict.fromkeys(T._PARAMS, False)
    for g in (bwd_grads or {}):
        need[{"D_SLOPE": "alibi", "D_TABLE": "table", "D_AK": "rel_key", "D_AV": "rel_value", "D_BIAS": "bias",
              "D_SINKS": "sinks", "D_U": "rel_u", "D_W": "rel_w"}[g]] = True
    T._backward(L, q, k, v, out, lse2, torch.randn_like(out), None, need, wrap=Cap)
    return calls


def posattn_cases(only=None, aot=False, dims=(64, 128)):
    """Yield (name, meta, fn, sig, cx, attrs, options) for the requested posattn kernels."""
    from posattn import _triton as T
    from posattn.kernels import attention as A
    for D in dims:
        for enc_name, enc in FWD_ENCODINGS.items():
            yield ("fwd", enc_name, D, enc, {})
        for enc_name, (enc, grads) in BWD_ENCODINGS.items():
            yield ("bwd", enc_name, D, enc, grads)


def _delta_pass(kw):
    """Whether a captured dQ launch is the exact-delta pass (a GRADS bit, or the
    DELTA_PASS keyword of posattn before the constexpr bitfields)."""
    if "GRADS" in kw:
        from posattn.kernels import attention as A
        return bool((kw["GRADS"] >> A._DELTA_PASS.value) & 1)
    return bool(kw.get("DELTA_PASS"))


def _table_pass(kw):
    """Whether a captured dQ launch is d(table)'s pass over the near tiles (GRADS bit)."""
    from posattn.kernels import attention as A
    return hasattr(A, "_TABLE_PASS") and bool((kw.get("GRADS", 0) >> A._TABLE_PASS.value) & 1)


def build_posattn(direction, enc_name, D, enc, grads, aot=False):
    from posattn import _triton as T
    from posattn.kernels import attention as A
    out = []
    flags = dict(NONE, **enc)
    for fact in ("BIAS_BATCH", "BIAS_HEADS", "WINDOW", "DECODE", "N"):   # launch facts, not flags
        flags.pop(fact, None)
    if flags["ROT_DIM"] == -1:
        flags["ROT_DIM"] = D
    rel = flags["REL_K"] or flags["REL_V"]
    backward = direction == "bwd"
    bm, bn, bd, warps, stages = T._config(D, backward, rel, gpu=True, fp32=False)
    if aot:
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        names = ["_attn_fwd"] if not backward else ["_attn_bwd_dkdv", "_attn_bwd_dq"]
        for name in names:
            fn = getattr(A, name)
            g = dict(D_SLOPE=False, D_TABLE=False, D_U=False, D_W=False, D_AK=False, D_AV=False, BLOCK_T=16)
            g.update(grads)
            if grads.get("D_TABLE"):
                g["BLOCK_T"] = 256
            cx = dict(flags, **blocks, **g, DELTA_PASS=False, HAS_DLSE=False)
            sig, cx = aot_signature(fn, cx, "bf16", flags)
            opts = dict(num_warps=warps, num_stages=stages)
            out.append((name, fn, sig, cx, None, opts))
        return out, (bm, bn, warps, stages)
    calls = posattn_launches(enc, D, backward, grads)
    for kern, a, kw in calls:
        name = kern.fn.__name__
        if name == "_attn_fwd":   # the launcher's tile (it may differ from _config's: short queries)
            bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
            warps, stages = kw.get("num_warps", warps), kw.get("num_stages", stages)
        if name == "_attn_bwd_delta":
            continue  # no loop: delta = rowsum(dO * O)
        fn, sig, cx, attrs, opts = jit_specialise(kern, a, kw)
        if name == "_attn_bwd_dq" and _delta_pass(kw):
            name = "_attn_bwd_dq[DELTA_PASS]"
        elif name == "_attn_bwd_dq" and _table_pass(kw):
            name = "_attn_bwd_dq[TABLE_PASS]"
        out.append((name, fn, sig, cx, attrs, opts))
    return out, (bm, bn, warps, stages)


def run_posattn(outdir, only=None, aot=False, dims=(64, 128), extra_ptxas=None):
    recs = []
    for direction, enc_name, D, enc, grads in posattn_cases(dims=dims):
        tag = f"posattn/{direction}/{enc_name}/D{D}"
        if only and not any(o in tag for o in only):
            continue
        kernels, (bm, bn, warps, stages) = build_posattn(direction, enc_name, D, enc, grads, aot=aot)
        for name, fn, sig, cx, attrs, opts in kernels:
            cname = f"posattn__{direction}__{enc_name}__D{D}__{name}{'__aot' if aot else ''}".replace(
                "[", "_").replace("]", "").replace("+", "_")
            meta = dict(lib="posattn", kernel=name, variant=enc_name, D=D, direction=direction,
                        causal=bool(enc.get("CAUSAL")), block_m=bm, block_n=bn, tile=[bm, bn],
                        mode="aot" if aot else "launch",
                        constexprs={k: v for k, v in (cx or {}).items() if isinstance(v, (int, bool, float))
                                    and not isinstance(k, tuple)},
                        n_attrs=len(attrs or {}))
            try:
                k, secs = compile_src(fn, sig, cx, attrs, opts)
            except Exception as e:  # record and go on
                rec = dict(name=cname, **meta, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
                print("FAIL", cname, rec["error"], flush=True)
                recs.append(rec)
                continue
            rec = analyse_compiled(k, cname, meta, outdir, extra_ptxas)
            rec["compile_s"] = round(secs, 1)
            json.dump(rec, open(os.path.join(outdir, cname + ".json"), "w"), indent=1)
            print(summary_line(rec), flush=True)
            recs.append(rec)
    return recs


# ----------------------------------------------------------------------------- tutorial cases

def prepare_tutorial(src, dst, dtype="bf16"):
    """An importable copy of Triton's 06-fused-attention.py for a machine without a
    GPU: the kernels and the config lists unchanged; the device probes answer as on
    an H100 (CUDA, capability 9); pytest, tests and benchmarks dropped. With
    dtype='bf16' the kernels' hard-coded tl.float16 casts become tl.bfloat16 (the
    tutorial is fp16-only; its tl.dot would reject bf16 x fp16 operands)."""
    text = open(src).read()
    cut = text.index("TORCH_HAS_FP8 = hasattr")
    text = text[:cut]
    reps = [
        ("import pytest\n", ""),
        ("DEVICE = triton.runtime.driver.active.get_active_torch_device()", 'DEVICE = "cuda"  # probe removed'),
        ('return triton.runtime.driver.active.get_current_target().backend == "hip"', "return False"),
        ('return triton.runtime.driver.active.get_current_target().backend == "cuda"', "return True"),
        ("return is_cuda() and torch.cuda.get_device_capability()[0] >= 9", "return True"),
        ("return is_cuda() and torch.cuda.get_device_capability()[0] == 10", "return False"),
        ("return is_cuda() and torch.cuda.get_device_capability()[0] == 9", "return True"),
        ("torch.cuda.get_device_capability()[0] == 9", "True"),
    ]
    for a, b in reps:
        if a not in text:
            raise RuntimeError(f"tutorial patch did not apply: {a!r}")
        text = text.replace(a, b)
    if "PYTEST_VERSION" in os.environ:
        raise RuntimeError("unset PYTEST_VERSION: the tutorial then keeps a single config")
    if dtype == "bf16":
        n = text.count("tl.float16")
        text = text.replace("tl.float16", "tl.bfloat16")
        text = f"# bf16 copy: {n} occurrences of tl.float16 replaced by tl.bfloat16\n" + text
    open(dst, "w").write(text)
    return dst


def load_module(path, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# The forward configs compiled for the table: among those the tutorial's autotuner
# keeps on Hopper (printed by --suite tutorial), the ones the brief names.
# The kernel's tl.static_assert(BLOCK_N <= HEAD_DIM) rejects BLOCK_N = 128 at D = 64,
# and keep() drops 8 warps below 128x128 tiles, so at D = 64 only 4-warp configs remain.
TUT_FWD_CONFIGS = {64: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
                   128: [(128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3)]}
TUT_WS_CONFIGS = {64: [(128, 64, 4, 3)], 128: [(128, 128, 8, 3), (128, 64, 4, 3)]}


def run_tutorial(outdir, tut_path, only=None, dims=(64, 128), dtype="bf16", ws=True, extra_ptxas=None,
                 configs=None):
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dst = os.path.join(tempfile.gettempdir(), f"tutorial_fa_{dtype}.py")
    prepare_tutorial(tut_path, dst, dtype)
    M_ = load_module(dst, f"tutorial_fa_{dtype}")
    fwd = M_._attn_fwd
    hopper = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in fwd.configs]
    print(f"tutorial: {len(hopper)} forward configs kept on Hopper by keep(): {sorted(hopper)}", flush=True)
    recs = []
    Z, H, N = PB, PH, PN
    for D in dims:
        q = torch.randn(Z, H, N, D, dtype=tdt)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        o = torch.empty_like(q)
        Mst = torch.empty(Z, H, N, dtype=torch.float32)
        y = Z * H * N
        for causal in (False, True):
            stage = 3 if causal else 1
            variants = [(cfg, False) for cfg in (configs or TUT_FWD_CONFIGS[D])]
            if ws and not causal:  # the tutorial benchmarks warp_specialize on Hopper for non-causal forward only
                variants += [(cfg, True) for cfg in TUT_WS_CONFIGS[D]]
            for (bm, bn, w, s), wspec in variants:
                if causal and bm < bn:
                    continue  # prune_invalid_configs drops BLOCK_M < BLOCK_N for causal
                tag = f"tutorial/fwd/{'causal' if causal else 'plain'}/D{D}/{bm}x{bn}w{w}s{s}{'/ws' if wspec else ''}"
                if only and not any(x in tag for x in only):
                    continue
                if wspec:   # Hopper + warp_specialize: raw pointers, on-device tensor descriptors
                    dq_, dk_, dv_, do_ = q, k, v, o
                else:       # host TensorDescriptors with the block shapes _host_descriptor_pre_hook sets
                    dq_ = TensorDescriptor(q, shape=[y, D], strides=[D, 1], block_shape=[bm, D])
                    dk_ = TensorDescriptor(k, shape=[y, D], strides=[D, 1], block_shape=[bn, D])
                    dv_ = TensorDescriptor(v, shape=[y, D], strides=[D, 1], block_shape=[bn, D])
                    do_ = TensorDescriptor(o, shape=[y, D], strides=[D, 1], block_shape=[bm, D])
                args = (0.125, Mst, Z, H, dq_, dk_, dv_, do_)
                kw = dict(N_CTX=N, HEAD_DIM=D, FP8_OUTPUT=False, STAGE=stage, warp_specialize=wspec,
                          IS_HOPPER=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                fn, sig, cx, attrs, opts = jit_specialise(fwd, args, kw)
                variant = ("causal" if causal else "plain") + f" {bm}x{bn} w{w} s{s}" + (" WS" if wspec else "")
                cname = (f"tutorial_{dtype}__fwd__{'causal' if causal else 'plain'}__D{D}__{bm}x{bn}w{w}s{s}"
                         f"{'_ws' if wspec else ''}")
                meta = dict(lib="tutorial", kernel="_attn_fwd", variant=variant, D=D, direction="fwd",
                            causal=causal, block_m=bm, block_n=bn, tile=[bm, bn], mode="launch",
                            warp_specialize=wspec, dtype=dtype, n_attrs=len(attrs or {}))
                recs += _compile_record(fn, sig, cx, attrs, opts, cname, meta, outdir, extra_ptxas)
        # backward: one fixed launch in the tutorial (no autotuning)
        for causal in (False, True):
            tag = f"tutorial/bwd/{'causal' if causal else 'plain'}/D{D}"
            if only and not any(x in tag for x in only):
                continue
            do = torch.randn_like(q)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            delta = torch.empty_like(Mst)
            args = (q, k, v, 0.125, do, dq, dk, dv, Mst, delta, q.stride(0), q.stride(1), q.stride(2), q.stride(3),
                    H, N)
            kw = dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, BLK_SLICE_FACTOR=2, HEAD_DIM=D,
                      num_warps=4, num_stages=5, CAUSAL=causal)
            fn, sig, cx, attrs, opts = jit_specialise(M_._attn_bwd, args, kw)
            cname = f"tutorial_{dtype}__bwd__{'causal' if causal else 'plain'}__D{D}"
            meta = dict(lib="tutorial", kernel="_attn_bwd", variant=("causal" if causal else "plain"), D=D,
                        direction="bwd", causal=causal, block_m=None, block_n=None, tile=None, mode="launch",
                        dtype=dtype, n_attrs=len(attrs or {}),
                        loop_tiles=([[16, 128], [32, 128], [128, 16], [128, 32]] if causal
                                    else [[32, 128], [128, 32]]),
                        loop_names=(["dkdv(masked, 16x128)", "dkdv(32x128)", "dq(masked, 128x16)", "dq(128x32)"]
                                    if causal else ["dkdv(32x128)", "dq(128x32)"]))
            recs += _compile_record(fn, sig, cx, attrs, opts, cname, meta, outdir, extra_ptxas)
    return recs


def _compile_record(fn, sig, cx, attrs, opts, cname, meta, outdir, extra_ptxas):
    try:
        k, secs = compile_src(fn, sig, cx, attrs, opts)
    except Exception as e:
        rec = dict(name=cname, **meta, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-3:]}")
        print("FAIL", cname, rec["error"], flush=True)
        return [rec]
    rec = analyse_compiled(k, cname, meta, outdir, extra_ptxas)
    if meta.get("loop_tiles"):  # per-loop tiles (tutorial backward): map loops with MMAs in address order
        mma_loops = [L for L in rec["loops"] if L["own"]["classes"].get("mma")]
        for L, t, nm in zip(mma_loops, meta["loop_tiles"], meta["loop_names"]):
            L["tile"], L["label"] = t, nm
            L["model"] = loop_model(L, rec["num_warps"], t)
    rec["compile_s"] = round(secs, 1)
    json.dump(rec, open(os.path.join(outdir, cname + ".json"), "w"), indent=1)
    print(summary_line(rec), flush=True)
    return [rec]


# ----------------------------------------------------------------------------- output

def hot_loops(rec):
    """Loops whose own blocks hold MMAs, and the loops nested in them."""
    loops = rec.get("loops", [])
    hot = [L for L in loops if L["own"]["classes"].get("mma")]
    heads = {L["header"] for L in hot}
    nested = [L for L in loops if L["parent"] in heads and L not in hot and not L.get("wait_spin")]
    return hot, nested


def summary_line(rec):
    hot, nested = hot_loops(rec)
    p = rec["ptxas"]
    parts = [f"{rec['name']}: regs {p['regs']} spill {p['spill_stores']}/{p['spill_loads']} smem {rec['shared']} "
             f"ctas/SM {rec['ctas_per_sm']} ({rec['occupancy_limiter']}) cubin==triton {p['cubin_identical']} "
             f"{rec.get('compile_s')}s"]
    if rec.get("ws_group"):
        m = rec["ws_group"]["model"]
        parts.append(f"   WS group {rec['ws_group']['loops']}: {m['cycles']} cyc ({m['bound']}; mma {m['mma_cyc']} "
                     f"mufu {m['mufu_cyc']} issue {m['issue_cyc']}) /128x128 {m['cycles_per_128x128']}")
        hot = hot + [L for L in rec["loops"] if L.get("role") == "producer"]
    for L in hot + nested:
        c = L["own"]["classes"]
        m = L["model"]
        parts.append(f"   loop {L['header']} d{L['depth']} {L.get('label', '')}{L.get('role', '')} w{L['warps']} "
                     f"total {c['total']} "
                     f"mma {c.get('mma', 0)} {L['own']['mma']} mufu {c.get('mufu', 0)} {L['own']['mufu']} "
                     f"cond_blocks {L['cond_blocks']} -> {m['cycles']} cyc ({m['bound']}; mma {m['mma_cyc']} "
                     f"mufu {m['mufu_cyc']} issue {m['issue_cyc']}) /128x128 {m['cycles_per_128x128']}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- tables

COLS = ["mma", "mufu", "fp", "int", "cvt", "gmem", "smem", "tma", "local", "shfl", "sync", "pred", "other"]


def table_rows(recs):
    rows = []
    for r in recs:
        if "error" in r:
            rows.append(dict(rec=r, loop=None, label="COMPILE ERROR", model=None))
            continue
        hot, nested = hot_loops(r)
        if r.get("ws_group"):
            cons = [L for L in r["loops"] if L.get("role") == "consumer"]
            prod = [L for L in r["loops"] if L.get("role") == "producer"]
            rows.append(dict(rec=r, loop=cons[0], label=f"WS: {len(cons)} consumer WGs x {cons[0]['warps']} warps "
                             f"+ producer {prod[0]['warps'] if prod else 0} warps", model=r["ws_group"]["model"],
                             extra=prod[0] if prod else None, ws_n=len(cons)))
            continue
        for i, L in enumerate(hot):
            label = L.get("label", "")
            if r["lib"] == "tutorial" and r["direction"] == "fwd" and r["causal"] and len(hot) == 2:
                label = ["off-band (unmasked)", "on-band (masked)"][i]
            if r["lib"] == "posattn" and len(hot) > 1:
                label = f"loop {i}"
            rows.append(dict(rec=r, loop=L, label=label, model=L["model"]))
        groups = collections.OrderedDict()
        for L in nested:  # identical nested loops (libdevice sin/cos slow paths) collapse into one row
            key = (L["parent"], L["own"]["classes"]["total"], L["own"]["classes"].get("local", 0) > 0)
            groups.setdefault(key, []).append(L)
        for (parent, _, _), Ls in groups.items():
            L = Ls[0]
            many = f"{len(Ls)} loops like this, " if len(Ls) > 1 else ""
            slow = "libdevice sin/cos Payne-Hanek slow path, " if L["own"]["classes"].get("local") and \
                L["own"]["classes"].get("gmem") else ""
            rows.append(dict(rec=r, loop=L, label=f"inner loop of {parent}: {slow}{many}per trip", model=L["model"],
                             inner=True))
    return rows


def ref_cycles(rows):
    """Reference cycles per 128x128 tile: posattn plain per (direction, kernel, D), and the
    tutorial's best modelled config per (D, causal) for fwd, its unmasked dkdv/dq loops for bwd."""
    plain, tut = {}, {}
    for x in rows:
        r, m = x["rec"], x["model"]
        if not m or x.get("inner") or r.get("mode") == "aot":
            continue
        c = m["cycles_per_128x128"]
        if r["lib"] == "posattn" and r["variant"] == "plain":
            plain[(r["direction"], r["kernel"].split("[")[0], r["D"])] = c
        if r["lib"] == "tutorial":
            if r["direction"] == "fwd" and ("masked" not in x["label"] or "unmasked" in x["label"]):
                key = ("fwd", r["D"], r["causal"])
                if key not in tut or c < tut[key][0]:
                    tut[key] = (c, r["variant"])
            if r["direction"] == "bwd" and not r["causal"]:
                kind = "dkdv" if x["label"].startswith("dkdv") else "dq"
                tut[(kind, r["D"])] = (c, "bwd " + x["label"])
    return plain, tut


def fmt_row(x, plain, tut):
    r, L, m = x["rec"], x["loop"], x["model"]
    p = r.get("ptxas", {})
    if m is None:
        return f"| {r['lib']} | {r['kernel']} | {r['variant']} | {r['D']} | | | | | | | | {r.get('error', '')} |" + " |" * 20
    c = L["always"]["classes"]
    tot_own = L["own"]["classes"]["total"]
    n = c.get("total", 0)
    wsn = x.get("ws_n")
    mma_kind = ", ".join(f"{k}x{v}" for k, v in sorted(L["always"]["mma"].items())) or "-"
    mufu = ", ".join(f"{k}x{v}" for k, v in sorted(L["always"]["mufu"].items())) or "0"
    tile = r.get("tile") or L.get("tile")
    tile_s = f"{tile[0]}x{tile[1]}" if tile else ""
    cyc128 = m["cycles_per_128x128"]
    kern = r["kernel"].split("[")[0]
    rel_plain = rel_tut = ""
    if not x.get("inner"):
        if r["lib"] == "posattn":
            b = plain.get((r["direction"], kern, r["D"]))
            rel_plain = f"{cyc128 / b:.2f}" if b else ""
            key = ("fwd", r["D"], r["causal"]) if r["direction"] == "fwd" else \
                (("dkdv" if "dkdv" in kern else "dq"), r["D"])
            t = tut.get(key)
            rel_tut = f"{cyc128 / t[0]:.2f}" if t else ""
        else:
            key = ("fwd", r["D"], r["causal"]) if r["direction"] == "fwd" else None
            t = tut.get(key) if key else None
            rel_tut = f"{cyc128 / t[0]:.2f}" if t else ""
    static = f"{n}" + (f" ({tot_own} static)" if tot_own != n else "")
    if wsn:
        static = f"{n} x{wsn} WG" + (f" + {x['extra']['always']['classes']['total']} prod" if x.get("extra") else "")
    warps = L.get("warps", r["num_warps"])
    label = x["label"]
    variant = r["variant"] + (f" [{label}]" if label else "")
    counts = " | ".join(str(c.get(k, 0)) for k in COLS)
    return (f"| {r['lib']} | {kern}{'(delta pass)' if 'DELTA' in r['kernel'] else '(table pass)' if 'TABLE_PASS' in r['kernel'] else ''} | {variant} | {r['D']} | "
            f"{tile_s} | {r['num_warps']}/{r['num_stages']} | {p.get('regs')} | {p.get('spill_stores')}/"
            f"{p.get('spill_loads')} | {r['shared'] // 1024} | {r['ctas_per_sm']} | {mma_kind} | {mufu} | "
            f"{static} | {counts} | {m['mma_cyc']:.0f} | {m['mufu_cyc']:.0f} | {m['issue_cyc']:.0f} | "
            f"**{m['cycles']:.0f}** {m['bound']} | {cyc128:.0f} | {rel_plain} | {rel_tut} |")


HEADER = ("| lib | kernel | variant [loop] | D | tile MxN | warps/stages | regs | spill st/ld B | smem KiB | CTAs/SM | "
          "MMA instr/iter (per warp) | MUFU/iter | instr/iter/warp | " + " | ".join(c.upper() for c in COLS) +
          " | MMA cyc | MUFU cyc | issue cyc | est. cyc/iter (bound) | cyc per 128x128 | x posattn plain | "
          "x tutorial |")


def make_table(recs, select=None):
    rows = table_rows(recs)
    plain, tut = ref_cycles(rows)
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for x in rows:
        if select and not select(x):
            continue
        lines.append(fmt_row(x, plain, tut))
    return "\n".join(lines), plain, tut


def load_records(pattern):
    recs = [json.load(open(f)) for f in sorted(glob.glob(pattern))]
    order = {"posattn": 0, "tutorial": 1}
    kord = {"_attn_fwd": 0, "_attn_bwd_dkdv": 1, "_attn_bwd_dq": 2, "_attn_bwd_dq[DELTA_PASS]": 3,
            "_attn_bwd_dq[TABLE_PASS]": 4, "_attn_bwd": 5}
    vord = {("fwd", v): i for i, v in enumerate(FWD_ENCODINGS)}
    vord.update({("bwd", v): i for i, v in enumerate(BWD_ENCODINGS)})
    for r in recs:  # recompute the model from the stored counts (the model may change; the counts do not)
        if "error" in r:
            continue
        for L in r["loops"]:
            L.setdefault("warps", r["num_warps"])
            L["wait_spin"] = is_wait_spin(L)
            L["model"] = loop_model(L, L["warps"], r.get("tile") or L.get("tile"))
        if r.get("warp_specialized"):
            ws_assign(r)
    recs.sort(key=lambda r: (order.get(r.get("lib"), 9), r.get("direction") != "fwd", r.get("D", 0),
                             kord.get(r.get("kernel"), 9), vord.get((r.get("direction"), r.get("variant")), 99),
                             r.get("variant", "")))
    return recs


def table_trips(N, BM, BN, L, R, causal=False):
    """Average trips of posattn's D_TABLE histogram loop (for c in range(c_lo, c_hi + 1)) per
    visited BM x BN tile, default positions, Nq == Nk == N, DistanceBias(L, R)."""
    tot = n = 0
    for sm in range(0, N, BM):
        for sn in range(0, N, BN):
            if causal and sn > sm + BM - 1:
                continue
            lo, hi = sn - (sm + BM - 1), sn + BN - 1 - sm
            if causal:
                hi = min(hi, 0)
            tot += min(max(hi, -L), R) - min(max(lo, -L), R) + 1
            n += 1
    return tot / n


def grid_trips(BM, BN, wh=GRID[0], ww=GRID[1], chunk=None):
    """Per visited BM x BN tile of posattn's GridBias table pass, default positions,
    Nq == Nk == Wh * Ww, as kernels/params.py _grid_histogram picks them: (rounds from
    dS in key-code space, rounds that divide each slot's code, dy sums after the diagonal
    shift, visits: the table's chunks of posattn/_triton.py GRID_TABLE_CHUNK columns each
    program holds, that its dy reach). A tile with one dy runs none of the loops (a
    branch the model's 'always' count leaves out), and the move into code space is
    counted with the pass's body. Tables of up to one chunk: exact; larger, the loop
    trips are not split by chunk."""
    if chunk is None:
        from posattn._triton import GRID_TABLE_CHUNK as chunk
    N = wh * ww
    wide = 2 * ww - 1
    block_r = BN   # a code-space round's columns

    def code(p):
        return p + (p // ww) * (ww - 1)
    coded = rounds = sums = visits = n = 0
    for sm in range(0, N, BM):
        for sn in range(0, N, BN):
            m_last, n_last = min(sm + BM, N) - 1, min(sn + BN, N) - 1
            d_lo, d_hi = sm // ww - n_last // ww, m_last // ww - sn // ww
            n_dy = d_hi - d_lo + 1
            r = (code(m_last) - code(sn) - (code(sm) - code(n_last))) // block_r + 1
            if n_dy > 1 and code(n_last) - code(sn) < 2 * BN - 1 and r <= 2 * n_dy:
                coded += r
            elif n_dy > 1 and 5 * r <= 4 * n_dy:
                rounds += r
            elif n_dy > 1:
                sums += n_dy
            visits += len({t // chunk for d in range(d_lo, d_hi + 1)
                           for t in ((d + wh - 1) * wide, (d + wh - 1) * wide + wide - 1)})
            n += 1
    return coded / n, rounds / n, sums / n, visits / n


def enc_window(variant):
    """The GridBias window of a backward variant."""
    return BWD_ENCODINGS[variant][0].get("WINDOW", GRID)


def table_near(N, BM, BN, L, R):
    """Fraction of the BM x BN tiles (default positions, Nq == Nk == N, non-causal) that
    meet the band -L < rel < R of DistanceBias(L, R): posattn's near-diagonal loops; the
    others read one table column and run the far loops (kernels/scores.py _table_far)."""
    near = tot = 0
    for sm in range(0, N, BM):
        for sn in range(0, N, BN):
            tot += 1
            near += not (sn + BN - 1 <= sm - L or sn >= sm + BM - 1 + R)
    return near / tot


def _mixed(cycles, variant, direction, N, BM, BN):
    """Cycles per 128x128 block of a kernel with several hot loops, averaged over the
    tiles each loop visits at length N (DistanceBias: near / far loops), else its loop."""
    if direction == "fwd" and "shaw" in variant and len(cycles) == 2:
        # loop 0: interior tiles beyond the clip (plain + row constant), 1: the rest, masked
        f = table_near(N, BM, BN, SHAW_K, SHAW_K)
        return f * cycles[1] + (1 - f) * cycles[0]
    if len(cycles) == 1 or not ("table" in variant or "shaw" in variant or direction == "fwd" and variant == "alibi"):
        return cycles[-1]
    # the tiles meeting a band around the diagonal: DistanceBias's -L < rel < R, Shaw's
    # -K < rel < K, or rel = 0 for ALiBi alone (the forward splits its |rel| there)
    f = table_near(N, BM, BN, *((TABLE_L, TABLE_R) if "table" in variant else (SHAW_K, SHAW_K) if "shaw" in variant
                                else (0, 0)))
    if direction == "fwd":  # loop 0: far interior tiles, 1: near interior tiles, 2: boundary (none here)
        return f * cycles[1] + (1 - f) * cycles[0]
    return f * cycles[0] + (1 - f) * sum(cycles[1:]) / len(cycles[1:])   # loop 0 near, then the far ones


def fwd_totals(recs, Ns=(2048, 8192)):
    """Forward cycles per 128x128 block, non-causal, Nq == Nk == N: the tile mix of
    each loop (interior tiles only at these N)."""
    rows = table_rows(recs)
    per = collections.defaultdict(list)
    for x in rows:
        r, m = x["rec"], x["model"]
        if r.get("direction") != "fwd" or not m or x.get("inner") or r.get("lib") != "posattn" or r.get("causal") \
                or "causal" in r.get("variant", "") or r.get("mode") == "aot":
            continue
        per[(r["variant"], r["D"], tuple(r.get("tile") or ()))].append(m["cycles_per_128x128"])
    out = ["| variant | D | loops (cycles per 128x128) | N=%s | x posattn plain |" % " / N=".join(map(str, Ns)),
           "|---|---|---|---|---|"]
    plain = {D: c[0] for (v, D, _), c in per.items() if v == "plain"}
    for (v, D, tile), c in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][0] != "plain")):
        # interior tiles only (non-causal, N a multiple of the tiles): plain's loop 0; Swin's
        # 49 tokens are one boundary tile per program: its masked loop, the last
        cyc = ([c[-1] if v == "swin" else c[0] if len(c) < 3 and "shaw" not in v
                else _mixed(c, v, "fwd", N, tile[0], tile[1]) for N in Ns]
               if tile else [c[0]] * 2)
        out.append(f"| {v} | {D} | {' / '.join(f'{x:.0f}' for x in c)} | {' / '.join(f'{x:.0f}' for x in cyc)} | "
                   + (" / ".join(f"{x / plain[D]:.2f}" for x in cyc) if D in plain else "") + " |")
    return "\n".join(out)


def bwd_totals(recs, Ns=(2048, 8192)):
    """Backward cycles per 128x128 score tile, all loops of one backward summed."""
    rows = table_rows(recs)
    per = collections.defaultdict(dict)
    for x in rows:
        r, m = x["rec"], x["model"]
        if r.get("direction") != "bwd" or not m or r.get("mode") == "aot":
            continue
        if r["lib"] == "posattn":
            key = ("posattn", r["variant"], r["D"])
            k = r["kernel"]
            if x.get("inner"):
                if "Payne-Hanek" not in x["label"]:  # the D_TABLE histogram loops (libdevice slow paths: not taken)
                    per[key].setdefault("hist_loops", []).append(m["cycles_per_128x128"])
                    per[key]["hist_inner"] = m["cycles_per_128x128"]
            else:
                per[key].setdefault(k, []).append(m["cycles_per_128x128"])
        elif not r["causal"]:
            per[("tutorial", "plain", r["D"])]["dkdv" if x["label"].startswith("dkdv") else "dq"] = \
                m["cycles_per_128x128"]
    out = ["| lib | variant | D | dK/dV loop | dQ loop | delta pass | table pass (near tiles) | histogram (per trip) | "
           "total per 128x128 "
           "(N=%s) | x posattn plain | x tutorial |" % " / ".join(map(str, Ns)), "|---" * 11 + "|"]
    for (lib, v, D), d in sorted(per.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1] != "plain")):
        def cyc(name, N):
            c = d.get(name, 0)
            return _mixed(c, v, "bwd", N, 64, 64) if isinstance(c, list) else c
        dkdv = [cyc("_attn_bwd_dkdv", N) or cyc("dkdv", N) for N in Ns]
        dq = [cyc("_attn_bwd_dq", N) or cyc("dq", N) for N in Ns]
        dp = [cyc("_attn_bwd_dq[DELTA_PASS]", N) for N in Ns]
        # d(table)'s pass visits the near tiles only (GridBias: every tile)
        grid = v.startswith("grid") or v.startswith("swin")   # GridBias (Swin's: a 7 x 7 window)
        tp = [cyc("_attn_bwd_dq[TABLE_PASS]", N) * (grid_trips(64, 64, *enc_window(v))[3] if grid
                                                     else table_near(N, 64, 64, TABLE_L, TABLE_R)) for N in Ns]
        hist = d.get("hist_inner", 0)
        dbias = [cyc("_attn_bwd_dbias", N) for N in Ns]   # the dense-bias gradient's pass
        # d(aK, aV)'s interior rows: a pass over the tiles on the diagonals -K < rel < K only
        # (about the near-tile fraction of the grid)
        dbias = [x + cyc("_attn_bwd_rel", N) * table_near(N, 64, 64, SHAW_K, SHAW_K) for x, N in zip(dbias, Ns)]
        tots = []
        for i, N in enumerate(Ns):
            if grid and hist:   # GridBias: its code-space rounds, dividing rounds, dy sums
                loops = d["hist_loops"]
                trips = grid_trips(64, 64, *enc_window(v))[:3]
                extra = sum(a * b for a, b in zip(trips, loops[-3:]))
            else:
                extra = (table_trips(N, 64, 64, TABLE_L, TABLE_R) if hist else 0) * hist
            tots.append(dkdv[i] + dq[i] + dp[i] + tp[i] + dbias[i] + extra)
        base = per.get(("posattn", "plain", D), {})
        b = sum(sum(base.get(n, [0])) if isinstance(base.get(n), list) else base.get(n, 0)
                for n in ("_attn_bwd_dkdv", "_attn_bwd_dq"))
        tu = per.get(("tutorial", "plain", D), {})
        tb = tu.get("dkdv", 0) + tu.get("dq", 0)
        out.append(f"| {lib} | {v} | {D} | {' / '.join(f'{x:.0f}' for x in dkdv)} | "
                   f"{' / '.join(f'{x:.0f}' for x in dq)} | {' / '.join(f'{x:.0f}' for x in dp)} | "
                   f"{' / '.join(f'{x:.0f}' for x in tp)} | {hist:.0f} | "
                   + " / ".join(f"{t:.0f}" for t in tots) + " | "
                   + (" / ".join(f"{t / b:.2f}" for t in tots) if b else "") + " | "
                   + (" / ".join(f"{t / tb:.2f}" for t in tots) if tb else "") + " |")
    trips = ", ".join(f"N={N}: {table_trips(N, 64, 64, TABLE_L, TABLE_R):.2f}" for N in Ns)
    trips += "; GridBias code-space rounds / dividing rounds / dy sums / chunk visits: " + ", ".join(
        f"{w[0]} x {w[1]}: " + " / ".join(f"{x:.2f}" for x in grid_trips(64, 64, *w))
        for w in (GRID, enc_window("grid16+dgrid")))
    return "\n".join(out), trips


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=["posattn", "tutorial"])
    ap.add_argument("--out", default="sass-out")
    ap.add_argument("--only", action="append")
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--tutorial")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-ws", action="store_true")
    ap.add_argument("--extra-ptxas")
    ap.add_argument("--tut-configs", help="BMxBNwWsS,... e.g. 128x128w8s3")
    ap.add_argument("--table", help="glob of JSON records: print the markdown tables")
    args = ap.parse_args()
    if args.table:
        recs = load_records(args.table)
        for direction in ("fwd", "bwd"):
            t, _, _ = make_table(recs, lambda x, d=direction: x["rec"].get("direction") == d and
                                 x["rec"].get("mode") != "aot")
            print(f"\n### {direction}\n\n{t}\n")
        print(f"\n### forward totals (non-causal; DistanceBias L=R={TABLE_L}: near / far tiles mixed)\n\n"
              f"{fwd_totals(recs)}\n")
        t, trips = bwd_totals(recs)
        print(f"\n### backward totals (histogram trips per 64x64 tile, non-causal, L=R={TABLE_L}: {trips})\n\n{t}\n")
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")
    os.makedirs(args.out, exist_ok=True)
    dims = tuple(int(x) for x in args.dims.split(","))
    if args.suite == "posattn":
        run_posattn(args.out, args.only, args.aot, dims, args.extra_ptxas)
    elif args.suite == "tutorial":
        cfgs = None
        if args.tut_configs:
            cfgs = [tuple(int(x) for x in re.match(r"(\d+)x(\d+)w(\d+)s(\d+)", c).groups())
                    for c in args.tut_configs.split(",")]
        run_tutorial(args.out, args.tutorial, args.only, dims, args.dtype, not args.no_ws, args.extra_ptxas, cfgs)


if __name__ == "__main__":
    main()
