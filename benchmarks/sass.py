"""Static inspection of GPU kernels without a GPU: compile -> cubin -> SASS, resource usage, and
instruction counts by class (shared by benchmarks/static_cost.py and the CUDA backend's notes).

    from sass import compile_triton, resources, disassemble, parse, count_classes, loops

* ``compile_triton(fn, signature, constexprs, arch, attrs=None, options=None)``: a Triton kernel
  compiled ahead of time for ``sm_<arch>`` (90 means sm_90a); returns ``(cubin bytes, shared bytes)``.
  Any other cubin (nvcc ``-cubin``) works with the functions below too.
* ``resources(cubin)``: ``{kernel: {"registers", "stack", "local", "shared_static", "spill_ops"}}``
  from ``cuobjdump --dump-resource-usage`` (spill_ops counts the kernel's local-memory loads/stores).
* ``disassemble(cubin)``: SASS text (``nvdisasm``, with branch-target labels).
* ``parse(sass_text)``: ``{kernel: [Instr]}``; an ``Instr`` has ``addr``, ``opcode`` (with modifiers,
  e.g. ``ISETP.GE.AND``), ``base`` (``ISETP``), ``pred`` (``@P0`` or ``""``), ``operands``, ``target``
  (branch target address or None) and ``label`` (the label that starts at it, if any).
* ``loops(instrs)``: back edges ``(head_index, latch_index)``, innermost first.
* ``loop_paths(instrs, head, latch)``: every path through one iteration of a loop (head to latch,
  inner loops' bodies counted once, their back edges and divergence fall-backs not taken), as lists
  of instruction indices: per-branch instruction counts of a loop body.
* ``count_classes(instrs)``: a ``Counter`` by instruction class (``CLASSES`` below).

The binaries come from the ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels (requirements.txt).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Instruction classes by SASS base opcode.
CLASSES = {
    "tensor": {"HGMMA", "HMMA", "IMMA", "WARPGROUP", "UTCHMMA"},
    "int": {"ISETP", "SEL", "LOP3", "LOP", "IADD3", "IADD", "IMAD", "IMNMX", "VIMNMX", "SHF", "SHL", "SHR",
            "LEA", "PRMT", "VIADD", "IABS", "POPC", "FLO", "BREV", "SGXT", "BMSK", "PLOP3", "P2R", "R2P",
            "ISCADD", "IMUL", "I2I", "VIADDMNMX", "IDP", "ICMP", "XMAD", "MOV", "FSEL", "CS2R", "S2R", "S2UR",
            "I2IP", "IMNMX3"},
    "float": {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "F2F", "F2I", "I2F", "FCHK", "MUFU", "HADD2",
              "HMUL2", "HFMA2", "FRND", "DADD", "DMUL", "DFMA", "F2FP", "HSETP2", "FSWZADD"},
    "shuffle": {"SHFL"},
    "barrier": {"BAR", "MEMBAR", "SYNCS", "DEPBAR", "ARRIVES", "ERRBAR", "CCTL", "FENCE"},
    "global_load": {"LDG", "LDGSTS", "LDGDEPBAR", "UTMALDG", "LD", "UBLKCP"},
    "global_store": {"STG", "ST", "RED", "ATOM", "ATOMG", "UTMASTG"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "local": {"LDL", "STL"},
    "uniform": set(),  # every other U* opcode (the uniform datapath issues beside the vector one)
    "control": {"BRA", "BRX", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD", "VOTE",
                "VOTEU", "BPT", "JMP", "ELECT", "ENDCOLLECTIVE", "NANOSLEEP", "ACQBULK", "ACQSHMINIT"},
}

# Throughputs assumed for sm_90 (H100 SXM), in warp-instructions per clock per SM (4 sub-partitions,
# one issue each per clock): every instruction takes an issue slot (4/clk); fp32 arithmetic 128 lanes/clk
# (4/clk); integer compare/select/logic/add 64 lanes/clk (2/clk), the review's rate (half the fp32
# rate); shuffles 32 lanes/clk (1/clk); shared-memory accesses 1/clk. Tensor-core work is costed by
# FLOPs (static_cost.py), barriers and branches only by their issue slot.
RATES = {"issue": 4.0, "int": 2.0, "float": 4.0, "shuffle": 1.0, "shared": 1.0}


def _tool(name: str) -> str:
    import nvidia.cu13  # the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels

    path = Path(list(nvidia.cu13.__path__)[0]) / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    return str(path)


def compile_triton(fn, signature: dict, constexprs: dict, arch: int, attrs: dict | None = None,
                   options: dict | None = None) -> tuple[bytes, int]:
    """Ahead-of-time compile of a ``@triton.jit`` kernel for sm_<arch>: (cubin, dynamic shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or {})
    return compiled.asm["cubin"], int(compiled.metadata.shared)


def _run_on_cubin(args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run(args + [f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def resources(cubin: bytes) -> dict:
    out = _run_on_cubin([_tool("cuobjdump"), "--dump-resource-usage"], cubin)
    res = {}
    for name, body in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", out):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", body))
        res[name] = {"registers": int(fields["REG"]), "stack": int(fields["STACK"]),
                     "local": int(fields["LOCAL"]), "shared_static": int(fields["SHARED"])}
    for name, instrs in parse(disassemble(cubin)).items():
        if name in res:
            res[name]["spill_ops"] = sum(1 for i in instrs if i.base in ("LDL", "STL"))
    return res


def disassemble(cubin: bytes) -> str:
    return _run_on_cubin([_tool("nvdisasm"), "-c"], cubin)


@dataclass
class Instr:
    addr: int
    opcode: str
    base: str
    pred: str
    operands: str
    target: int | None
    label: str | None


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\S+):\s*$")
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse(sass_text: str) -> dict[str, list[Instr]]:
    kernels: dict[str, list[Instr]] = {}
    pending_labels: dict[str, list[Instr]] = {}
    label_addr: dict[str, dict[str, int]] = {}
    current = None
    label = None
    for line in sass_text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            kernels[current] = []
            label_addr[current] = {}
            label = None
            continue
        if current is None:
            continue
        m = _LINE.match(line)
        if m:
            opcode = m.group(3)
            kernels[current].append(Instr(int(m.group(1), 16), opcode, opcode.split(".")[0],
                                          (m.group(2) or "").strip(), m.group(4).strip(), None, label))
            if label:
                label_addr[current][label] = int(m.group(1), 16)
            label = None
            continue
        m = _LABEL.match(line)
        if m and m.group(1).startswith(".L_x_"):
            label = m.group(1)
    for name, instrs in kernels.items():
        for ins in instrs:
            t = _TARGET.search(ins.operands)
            if t and t.group(1) in label_addr[name]:
                ins.target = label_addr[name][t.group(1)]
    return kernels


def instr_class(base: str) -> str:
    for cls, names in CLASSES.items():
        if base in names:
            return cls
    if base.startswith("U"):
        return "uniform"
    return "other"


def count_classes(instrs: list[Instr]) -> Counter:
    c = Counter(instr_class(i.base) for i in instrs)
    c["total"] = len(instrs)
    return c


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """Back edges as (index of the loop head, index of the branch), innermost (shortest) first."""
    index = {ins.addr: n for n, ins in enumerate(instrs)}
    edges = [(index[ins.target], n) for n, ins in enumerate(instrs)
             if ins.base == "BRA" and ins.target is not None and ins.target <= ins.addr]
    return sorted(edges, key=lambda e: e[1] - e[0])


def _blocks(instrs: list[Instr]):
    """Basic blocks as (start, end) index pairs and their successors (block indices). ``BRA.DIV``
    (the fall-back of a warp-uniform branch for diverged warps) is taken as not taken."""
    index = {ins.addr: n for n, ins in enumerate(instrs)}
    leaders = {0}
    for n, ins in enumerate(instrs):
        if ins.target is not None:
            leaders.add(index[ins.target])
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP"):
            leaders.add(n + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    bounds = list(zip(starts, starts[1:] + [len(instrs)]))
    block_of = {st: b for b, (st, _) in enumerate(bounds)}
    succ = []
    for b, (st, end) in enumerate(bounds):
        last = instrs[end - 1]
        nxt = [b + 1] if b + 1 < len(bounds) else []
        if last.base == "BRA" and ".DIV" not in last.opcode and last.target is not None:
            tgt = [block_of[index[last.target]]]
            succ.append(tgt + nxt if last.pred else tgt)
        elif last.base in ("EXIT", "RET") and not last.pred:
            succ.append([])
        else:
            succ.append(nxt)
    return bounds, succ


def loop_paths(instrs: list[Instr], head: int, latch: int, limit: int = 20000) -> list[list[int]]:
    """Every acyclic path from the loop head to its latch that stays inside [head, latch] (so inner
    loops' bodies appear once), as the list of instruction indices it executes."""
    bounds, succ = _blocks(instrs)
    start = next(b for b, (st, end) in enumerate(bounds) if st <= head < end)
    stop = next(b for b, (st, end) in enumerate(bounds) if st <= latch < end)
    out: list[list[int]] = []

    def walk(b: int, path: list[int]):
        if len(out) >= limit:
            raise RuntimeError(f"more than {limit} paths")
        if b == stop:
            out.append(path + [b])
            return
        for c in succ[b]:
            if c > b and bounds[c][0] <= latch:  # forward edges inside the loop only
                walk(c, path + [b])

    walk(start, [])
    return [[n for b in p for n in range(*bounds[b])] for p in out]


def issue_cycles(counts: Counter, warps: int = 1) -> dict:
    """Clocks per SM for ``warps`` warps each executing ``counts``, per resource; the model takes the
    busiest resource as the time (``"bound"``), i.e. assumes the resources overlap perfectly and
    nothing else (latency, dependencies, the tensor cores) stalls the issue."""
    per = {"issue": counts.get("total", 0) / RATES["issue"], "int": counts.get("int", 0) / RATES["int"],
           "float": counts.get("float", 0) / RATES["float"], "shuffle": counts.get("shuffle", 0) / RATES["shuffle"],
           "shared": counts.get("shared", 0) / RATES["shared"]}
    per = {k: v * warps for k, v in per.items()}
    per["bound"] = max(per.values())
    return per


@dataclass
class Loop:
    """A natural loop of the control-flow graph: ``header`` and ``blocks`` are basic-block indices
    (``_blocks``), ``own`` the blocks of no inner loop, ``children`` the loops directly inside."""
    header: int
    blocks: set
    own: set
    children: list
    parent: "Loop | None" = None

    def instructions(self, bounds) -> list[int]:
        return [n for b in sorted(self.blocks) for n in range(*bounds[b])]


def cfg(instrs: list[Instr]):
    """(bounds, successors) of the basic blocks: ``_blocks``, i.e. ``BRA.DIV`` not taken."""
    return _blocks(instrs)


def natural_loops(instrs: list[Instr]) -> tuple[list, list[Loop]]:
    """(block bounds, loops): the natural loops of the kernel's control-flow graph (a back edge u -> h
    where h dominates u; the body is every block that reaches u without passing h; loops sharing a
    header merged), nested by containment. Unlike ``loops`` this does not assume a loop's blocks lie
    between its head and its back edge in the binary (the compiler places exit paths anywhere)."""
    bounds, succ = _blocks(instrs)
    n = len(bounds)
    pred = [[] for _ in range(n)]
    for b, ss in enumerate(succ):
        for s in ss:
            pred[s].append(b)
    # reachable blocks and their dominators (iterative data flow from block 0)
    reach, stack = {0}, [0]
    while stack:
        for s in succ[stack.pop()]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    order = sorted(reach)
    dom = {b: set(reach) for b in order}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [p for p in pred[b] if p in reach]
            new = set.intersection(*(dom[p] for p in ps)) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    bodies: dict[int, set] = {}
    for u in order:
        for h in succ[u]:
            if h in dom[u]:  # back edge u -> h
                body, work = {h, u}, [u]
                while work:
                    x = work.pop()
                    if x == h:
                        continue
                    for p in pred[x]:
                        if p in reach and p not in body:
                            body.add(p)
                            work.append(p)
                bodies.setdefault(h, set()).update(body)
    loops_ = sorted((Loop(h, body, set(body), []) for h, body in bodies.items()), key=lambda lp: len(lp.blocks))
    for i, inner in enumerate(loops_):  # the smallest enclosing loop is the parent
        for outer in loops_[i + 1:]:
            if inner.blocks <= outer.blocks and inner.header != outer.header:
                inner.parent = outer
                outer.children.append(inner)
                break
    for lp in loops_:
        for ch in lp.children:
            lp.own -= ch.blocks
    return bounds, loops_


def iteration_paths(instrs: list[Instr], bounds, loop: Loop, limit: int = 20000) -> list[tuple[list[int], list[Loop]]]:
    """Every acyclic path through one iteration of ``loop``: from its header back to the header (or out
    of the loop), its inner loops each taken as one step (entered at the header, left by any exit).
    Returns (the instruction indices of the loop's own blocks on the path, the inner loops entered)."""
    _, succ = _blocks(instrs)
    inner_of = {b: ch for ch in loop.children for b in ch.blocks}

    def exits(ch: Loop) -> set:
        return {s for b in ch.blocks for s in succ[b] if s not in ch.blocks}

    out: list = []

    def walk(node, own: list, entered: list, seen: set):
        if len(out) >= limit:
            raise RuntimeError(f"more than {limit} paths")
        if isinstance(node, Loop):
            nexts = exits(node)
        else:
            own = own + [node]
            nexts = succ[node]
        for s in nexts:
            if s == loop.header or s not in loop.blocks:
                out.append((own, entered))
                continue
            nxt = inner_of.get(s, s)
            key = id(nxt) if isinstance(nxt, Loop) else nxt
            if key in seen:
                continue
            walk(nxt, own, entered + [nxt] if isinstance(nxt, Loop) else entered, seen | {key})

    walk(loop.header, [], [], {loop.header})
    return [([i for b in own for i in range(*bounds[b])], entered) for own, entered in out]
