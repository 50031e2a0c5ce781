"""What a compiled XLA program holds: its kernels, its Pallas calls, its memory, ptxas' report.

`kernels_per_step(hlo_text)` counts the kernels an XLA:GPU program launches per execution,
statically, from the optimised HLO (`compiled.as_text()`). The rules:
  * every fusion, custom call (cuBLAS, Triton), copy, collective and other computing
    instruction counts once;
  * parameters, constants, tuples, bitcasts and the like launch nothing, and an asynchronous
    pair (`*-start` / `*-done`) counts once;
  * a while loop counts its body times its known trip count (XLA records it in the loop's
    backend config; a loop without one counts once and is reported); its condition is not
    counted;
  * a call (command buffers are calls) counts the kernels inside; a conditional its largest
    branch.
Calibrated against a profile: the paper's Rule 110 step of tree 341ba11 launched 6,323 kernels
on an H100 (docs/results/gpu/report.md); these rules count 6,133 for that tree from a deviceless
compile with jax 0.11.2 (3% fewer: the runtime adds a few memsets and copies).

`ptxas_report(dump_dir, names)` runs ptxas over the PTX of the named kernels that a compile
dumped (`compiler_options={"xla_dump_to": dump_dir}`) and reads what XLA itself only logs: the
registers per thread and the bytes spilled to local memory, with the shared memory each
kernel's launch asks for (from the dumped thunk sequence).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import subprocess

MOSAIC_CALL = re.compile(r'custom_call_target="tpu_custom_call"')
TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton"')

# Instructions that launch nothing.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "after-all",
  "add-dependency",
  "opt-barrier",
  "partition-id",
  "replica-id",
  "domain",
}
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
  """{computation name: [(opcode, the rest of the line)]} and the entry computation's name."""
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        entry = current if match.group(1) else entry
    elif line.startswith("}"):
      current = None
    else:
      match = _INSTRUCTION.match(line)
      if match:
        computations[current].append(match.groups())
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")
  return computations, entry


def _called(rest: str, attribute: str) -> str:
  return re.search(rf"{attribute}=%?([\w.\-]+)", rest).group(1)


def _kind(opcode: str, rest: str) -> str:
  """A kernel's kind for the breakdown: the fusion kind or the custom call's target."""
  if opcode == "fusion":
    return "fusion:" + re.search(r"kind=(\w+)", rest).group(1)
  if opcode == "custom-call":
    return re.search(r'custom_call_target="([^"]+)"', rest).group(1)
  return opcode.removesuffix("-start")


@dataclasses.dataclass
class KernelCount:
  total: int
  by_kind: dict[str, int]  # fusion kinds, custom-call targets, copies, collectives
  loops_without_trip_count: int


def kernels_per_step(hlo_text: str) -> KernelCount:
  """The kernels one execution of this optimised HLO module launches (rules: module docstring)."""
  computations, entry = _computations(hlo_text)
  by_kind: collections.Counter = collections.Counter()
  unknown_loops = 0

  def count(name: str, times: int) -> collections.Counter:
    nonlocal unknown_loops
    tally: collections.Counter = collections.Counter()
    for opcode, rest in computations[name]:
      if opcode in _FREE or opcode.endswith("-done"):
        continue
      if opcode == "while":
        trips = _TRIP_COUNT.search(rest)
        unknown_loops += trips is None
        tally += count(_called(rest, "body"), times * (int(trips.group(1)) if trips else 1))
      elif opcode == "call":
        tally += count(_called(rest, "to_apply"), times)
      elif opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest).group(1)
        counts = [count(b.strip().lstrip("%"), times) for b in branches.split(",")]
        tally += max(counts, key=lambda c: sum(c.values()))
      else:
        tally[_kind(opcode, rest)] += times
    return tally

  by_kind = count(entry, 1)
  return KernelCount(sum(by_kind.values()), dict(by_kind.most_common()), unknown_loops)


_NAMED_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY_SHAPE = re.compile(r"^(pred|[a-z]+(\d+)\w*)\[([\d,]*)\]$")


def _launching_computations(hlo_text: str) -> set[str]:
  """The computations whose instructions are kernels: the entry, loop bodies, called
  computations and conditional branches (not fused computations: their instructions are parts
  of one fusion kernel, not kernels of their own)."""
  computations, entry = _computations(hlo_text)
  found: set[str] = set()

  def visit(name: str) -> None:
    if name in found:
      return
    found.add(name)
    for opcode, rest in computations[name]:
      if opcode == "while":
        visit(_called(rest, "body"))
      elif opcode == "call":
        visit(_called(rest, "to_apply"))
      elif opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest).group(1)
        for branch in branches.split(","):
          visit(branch.strip().lstrip("%"))

  visit(entry)
  return found


def copies_of_arrays(hlo_text: str) -> list[str]:
  """The copy kernels of the module that move an array (not a scalar) for any reason but one:
  handing a cuBLAS matmul the buffer it accumulates into (its `C + A B` epilogue, which XLA
  gives a copy when the addend is read again). Layout changes, loop-carried values and stacked
  outputs all show here; a copy inside a fused computation does not (it is one of the fusion's
  outputs, written by that kernel). The returned strings are "name: shape"."""
  launching = _launching_computations(hlo_text)
  users: dict[str, list[str]] = collections.defaultdict(list)
  copies: dict[str, str] = {}
  current = None
  for line in hlo_text.splitlines():
    computation = _COMPUTATION.match(line)
    if computation:
      current = computation.group(2)
      continue
    match = _NAMED_INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    if opcode == "copy" and current in launching and not re.fullmatch(r"\w+\[\]", shape):
      copies[name] = shape.split("{")[0]
    for operand in re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0]):
      users[operand].append(line)
  epilogue = lambda line: "cublas" in line and "output_to_operand_aliasing" in line
  return [
    f"{name}: {shape}"
    for name, shape in copies.items()
    if not (users[name] and all(epilogue(line) for line in users[name]))
  ]


def array_bytes(shape: str) -> int:
  """Bytes of an array shape as HLO writes it ("f32[6,256]", "bf16[2,4,8]", "f8e4m3fn[4]", "pred[3]")."""
  match = _ARRAY_SHAPE.match(shape)
  if not match:
    raise ValueError(f"not an HLO array shape: {shape!r}")
  _, bits, dims = match.groups()
  bits = int(bits) if bits else 8  # pred: a byte
  elements = 1
  for dim in filter(None, dims.split(",")):
    elements *= int(dim)
  return elements * bits // 8


def pallas_calls(hlo_text: str) -> int:
  """Pallas kernel calls in a compiled module's text: Triton (GPU) plus Mosaic (TPU)."""
  return len(TRITON_CALL.findall(hlo_text)) + len(MOSAIC_CALL.findall(hlo_text))


def peak_bytes(compiled) -> int:
  """Per-device bytes live at the peak: arguments + outputs (minus donated aliases) + temps."""
  memory = compiled.memory_analysis()
  return int(
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )


def triton_kernel_names(hlo_text: str) -> list[str]:
  """The kernel names of the Triton calls (the `name=` of each pallas_call), sorted."""
  names = set()
  for line in hlo_text.splitlines():
    if TRITON_CALL.search(line):
      match = re.search(r'\bname = "([\w.$]+)"', line)  # the call's backend config
      if match:
        names.add(match.group(1))
  return sorted(names)


_PTXAS_NUMBERS = {
  "registers": re.compile(r"Used (\d+) registers"),
  "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
  "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_report(dump_dir: str, names: list[str], *, ptxas: str, arch: str = "sm_90a") -> dict:
  """{kernel name: registers, spill_store_bytes, spill_load_bytes, shared_memory_bytes}.

  Args:
    dump_dir: where a compile with `compiler_options={"xla_dump_to": dump_dir}` wrote its PTX
      (*.ptx, one module per kernel) and thunk sequence.
    names: the kernels to report (entry points of the PTX modules), e.g. `triton_kernel_names`.
    ptxas: the ptxas binary (sleep_jax.parallel.gpu_topology.ptxas_path()).
    arch: the GPU architecture to assemble for.
  """
  report = {}
  wanted = set(names)
  for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
    with open(path) as f:
      entry = re.search(r"\.entry\s+([\w$.]+)\s*\(", f.read())
    if entry is None or entry.group(1) not in wanted:
      continue
    log = subprocess.run(
      [ptxas, f"-arch={arch}", "-v", "--warn-on-spills", path, "-o", os.devnull],
      capture_output=True,
      text=True,
      check=True,
    ).stderr
    row = {key: int(m.group(1)) if (m := p.search(log)) else 0 for key, p in _PTXAS_NUMBERS.items()}
    report[entry.group(1)] = row
  for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence*.txt")):
    with open(path) as f:
      for kernel, shared in re.findall(r"(\w+) grid: .*?shared_memory: (\d+) bytes", f.read()):
        if kernel in report:
          report[kernel]["shared_memory_bytes"] = max(
            int(shared), report[kernel].get("shared_memory_bytes", 0)
          )
  return report
