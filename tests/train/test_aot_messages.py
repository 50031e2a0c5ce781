"""Reading XLA:TPU's out-of-memory refusal (runs without libtpu; the real refusal is compiled in
tests/tpu_compile/test_aot.py)."""

from sleep_jax.train import aot


def test_both_wordings_of_the_refusal_give_needed_and_available_bytes():
  current = RuntimeError(
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (59.04G) exceeds available HBM (15.75G)."
  )
  older = RuntimeError(
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
    "hbm. Used 21.95G of 512M hbm. Exceeded hbm capacity by 6.47G."
  )
  assert aot.out_of_hbm(current) == (int(59.04 * 2**30), int(15.75 * 2**30))
  assert aot.out_of_hbm(older) == (int(21.95 * 2**30), 512 * 2**20)


def test_other_errors_are_not_read_as_out_of_memory():
  assert aot.out_of_hbm(RuntimeError("INVALID_ARGUMENT: Used 1G of 2G hbm")) is None
  assert aot.out_of_hbm(RuntimeError("RESOURCE_EXHAUSTED: too many open files")) is None
