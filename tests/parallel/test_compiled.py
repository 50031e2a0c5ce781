"""Reading compiled programs: the static kernel count's rules, Pallas calls, ptxas' report."""

import stat
import textwrap

import pytest

from sleep_jax.parallel import compiled

# A hand-written optimised module: two kernels in the entry, a while loop of 4 trips whose body
# launches a fusion, a cuBLAS matmul and a command buffer (a call) of two kernels, and a
# conditional whose larger branch has two kernels.
HLO = textwrap.dedent(
  """\
  HloModule jit_step, is_scheduled=true

  %fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
    %p0 = f32[8]{0} parameter(0)
    %p1 = f32[8]{0} parameter(1)
    ROOT %add = f32[8]{0} add(%p0, %p1)
  }

  %command_buffer (p: f32[8]) -> f32[8] {
    %p = f32[8]{0} parameter(0)
    %a = f32[8]{0} fusion(%p, %p), kind=kLoop, calls=%fused_add
    ROOT %b = f32[8]{0} fusion(%a, %a), kind=kLoop, calls=%fused_add
  }

  %body (param: (s32[], f32[8])) -> (s32[], f32[8]) {
    %param = (s32[], f32[8]{0}) parameter(0)
    %i = s32[] get-tuple-element(%param), index=0
    %x = f32[8]{0} get-tuple-element(%param), index=1
    %y = f32[8]{0} fusion(%x, %x), kind=kInput, calls=%fused_add
    %mm = (f32[8]{0}, s8[64]{0}) custom-call(%y, %y), custom_call_target="__cublas$lt$matmul"
    %z = f32[8]{0} get-tuple-element(%mm), index=0
    %c = f32[8]{0} call(%z), to_apply=%command_buffer
    ROOT %t = (s32[], f32[8]{0}) tuple(%i, %c)
  }

  %cond (param: (s32[], f32[8])) -> pred[] {
    %param = (s32[], f32[8]{0}) parameter(0)
    %i = s32[] get-tuple-element(%param), index=0
    %n = s32[] constant(4)
    ROOT %lt = pred[] compare(%i, %n), direction=LT
  }

  %small (p: f32[8]) -> f32[8] {
    %p = f32[8]{0} parameter(0)
    ROOT %a = f32[8]{0} fusion(%p, %p), kind=kLoop, calls=%fused_add
  }

  %large (p: f32[8]) -> f32[8] {
    %p = f32[8]{0} parameter(0)
    %a = f32[8]{0} fusion(%p, %p), kind=kLoop, calls=%fused_add
    ROOT %b = f32[8]{0} copy(%a)
  }

  ENTRY %main (x: f32[8], k: s32[]) -> f32[8] {
    %x = f32[8]{0} parameter(0)
    %k = s32[] parameter(1)
    %zero = s32[] constant(0)
    %w0 = (s32[], f32[8]{0}) tuple(%zero, %x)
    %w = (s32[], f32[8]{0}) while(%w0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
    %r = f32[8]{0} get-tuple-element(%w), index=1
    %ar = f32[8]{0} all-reduce-start(%r), to_apply=%fused_add
    %ard = f32[8]{0} all-reduce-done(%ar)
    %t = f32[8]{0} custom-call(%ard), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "my_kernel", grid_x = 1 : i32}
    ROOT %s = f32[8]{0} conditional(%k, %t, %t), branch_computations={%small, %large}
  }
  """
)


def test_kernels_per_step_follows_the_counting_rules():
  count = compiled.kernels_per_step(HLO)
  # Loop: 4 trips x (fusion + matmul + 2 in the command buffer) = 16; then the all-reduce
  # (start and done: once), the Triton call, and the larger branch's 2.
  assert count.total == 16 + 1 + 1 + 2
  assert count.by_kind == {
    "fusion:kLoop": 4 * 2 + 1,
    "fusion:kInput": 4,
    "__cublas$lt$matmul": 4,
    "all-reduce": 1,
    "__gpu$xla.gpu.triton": 1,
    "copy": 1,
  }
  assert count.loops_without_trip_count == 0


def test_a_loop_without_a_known_trip_count_counts_once_and_is_reported():
  hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', "")
  count = compiled.kernels_per_step(hlo)
  assert count.total == 4 + 1 + 1 + 2 and count.loops_without_trip_count == 1


def test_text_without_an_entry_is_an_error():
  with pytest.raises(ValueError, match="no ENTRY"):
    compiled.kernels_per_step("HloModule m\n")


def test_triton_calls_and_their_kernel_names():
  assert compiled.pallas_calls(HLO) == 1
  assert compiled.triton_kernel_names(HLO) == ["my_kernel"]


def test_ptxas_report_reads_spills_registers_and_the_launch_shared_memory(tmp_path):
  # A stand-in ptxas that prints what ptxas -v prints for a kernel that spills.
  fake = tmp_path / "ptxas"
  fake.write_text(
    "#!/bin/sh\n"
    "echo \"ptxas info    : Compiling entry function 'my_kernel' for 'sm_90a'\" >&2\n"
    'echo "    1680 bytes stack frame, 2792 bytes spill stores, 2800 bytes spill loads" >&2\n'
    'echo "ptxas info    : Used 255 registers, used 1 barriers" >&2\n'
  )
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  (tmp_path / "module.1.ptx").write_text(".visible .entry my_kernel(\n.param .u64 p\n)\n{\n}\n")
  (tmp_path / "module.2.ptx").write_text(".visible .entry other_kernel(\n)\n{\n}\n")
  (tmp_path / "module.thunk_sequence.txt").write_text(
    "001: kCustomKernel my_kernel grid: [2, 4, 2] threads: [128, 1, 1]  shared_memory: 81920 bytes\n"
  )
  report = compiled.ptxas_report(str(tmp_path), ["my_kernel"], ptxas=str(fake))
  assert report == {
    "my_kernel": {
      "registers": 255,
      "spill_store_bytes": 2792,
      "spill_load_bytes": 2800,
      "shared_memory_bytes": 81920,
    }
  }


def test_copies_of_arrays_leave_out_scalars_fused_copies_and_the_matmul_accumulator_copies():
  hlo = textwrap.dedent(
    """\
    HloModule m

    %fused_zeros (p: f32[]) -> (f32[4,4], f32[4,4]) {
      %p = f32[] parameter(0)
      %zeros = f32[4,4]{1,0} broadcast(%p), dimensions={}
      %twin = f32[4,4]{1,0} copy(%zeros)
      ROOT %both = (f32[4,4]{1,0}, f32[4,4]{1,0}) tuple(%zeros, %twin)
    }

    %body (c: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
      %c = (s32[], f32[2,2]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%c), index=0
      %carried = f32[2,2]{1,0} get-tuple-element(%c), index=1
      %plumbing = f32[2,2]{1,0} copy(%carried)
      ROOT %next = (s32[], f32[2,2]{1,0}) tuple(%i, %plumbing)
    }

    ENTRY %main (x: f32[8,8], n: s32[]) -> f32[8,8] {
      %x = f32[8,8]{1,0} parameter(0)
      %n = s32[] parameter(1)
      %counter = s32[] copy(%n)
      %addend = f32[8,8]{1,0} copy(%x)
      %mm = (f32[8,8]{1,0}, s8[64]{0}) custom-call(%x, %x, %addend), custom_call_target=\
"__cublas$lt$matmul", output_to_operand_aliasing={{0}: (2, {})}
      %y = f32[8,8]{1,0} get-tuple-element(%mm), index=0
      %moved = f32[8,8]{0,1} copy(%y)
      %z = (f32[4,4]{1,0}, f32[4,4]{1,0}) fusion(%counter), kind=kLoop, calls=%fused_zeros
      %w = (s32[], f32[2,2]{1,0}) while(%init), condition=%cond, body=%body
      ROOT %out = f32[8,8]{1,0} add(%moved, %x)
    }
    """
  )
  assert compiled.copies_of_arrays(hlo) == ["plumbing: f32[2,2]", "moved: f32[8,8]"]


@pytest.mark.parametrize(
  "shape, size", [("f32[6,256]", 6144), ("bf16[2,4,8]", 128), ("pred[3]", 3), ("s32[]", 4)]
)
def test_array_bytes_reads_hlo_shapes(shape, size):
  assert compiled.array_bytes(shape) == size
