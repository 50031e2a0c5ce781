"""Stream a trained run's model, token by token, waking and sleeping as it would online.

  python launch/generate.py --workdir=runs/first_look/n4/depth2/seed0
      # held-out examples of the run's task, streamed; the answers it predicts, and its accuracy
      # beside the batch evaluation (`apply`) of the same examples
  python launch/generate.py --workdir=runs/x --prompt=1,0,1,1,0 --max_new_tokens=20 [--temperature=0.7]
      # free generation after a prompt of token ids

The stream uses the run's own sleep config (passes N, window L, eviction): every fed token is
one wake pass over the window's KV cache and the fast weights, and every full window is slept
on (N passes) and evicted, so memory stays constant however long the stream runs.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sleep_jax import xla_flags

xla_flags.apply_defaults()  # before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import sleep_jax  # noqa: E402
from sleep_jax import console, rundir  # noqa: E402
from sleep_jax.data import tasks  # noqa: E402
from sleep_jax.train.checkpoint import restore_model  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory with a checkpoint.")
_EXAMPLES = flags.DEFINE_integer("examples", 4, "Held-out examples to stream (without --prompt).")
_PROMPT = flags.DEFINE_string("prompt", None, "Comma-separated token ids to generate after.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate after --prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])

logger = logging.getLogger("sleep_jax.launch")


def stream_examples(model, config, num: int) -> None:
  """Streams held-out examples whole; compares the answers with `apply` on the same tokens."""
  task = tasks.get_task(config.task)
  examples = tasks.heldout_set(task, seed=config.seed, num=num)
  tokens, mask = examples["tokens"], examples["loss_mask"] > 0
  state = sleep_jax.stream_init(model, num, sleep_config=config.sleep)
  streamed, _ = sleep_jax.stream_feed(model, state, tokens, sleep_config=config.sleep)
  batch = sleep_jax.apply(model, tokens, sleep_config=config.sleep)
  streamed, batch = np.argmax(streamed, -1), np.argmax(batch, -1)
  targets = examples["targets"]
  for row in range(num):
    positions = np.flatnonzero(mask[row])
    print(
      f"example {row}: answer {targets[row, positions].tolist()}  "
      f"streamed {streamed[row, positions].tolist()}  batch {batch[row, positions].tolist()}"
    )
  exact = lambda predicted: np.mean(
    [np.array_equal(predicted[r][mask[r]], targets[r][mask[r]]) for r in range(num)]
  )
  print(f"exact answers: streamed {exact(streamed):.3f}, batch (apply) {exact(batch):.3f}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure(verbosity=None)
  try:
    model, config, step = restore_model(_WORKDIR.value)
  except rundir.WorkdirError as e:
    logger.error("%s", e)
    sys.exit(1)
  sleep = config.sleep
  print(
    f"{_WORKDIR.value}: step {step}, N={sleep.passes}, L={sleep.window}, {sleep.eviction} "
    f"eviction, {jax.devices()[0].platform}"
  )
  if _PROMPT.value is None:
    stream_examples(model, config, _EXAMPLES.value)
    return
  prompt = np.array([[int(t) for t in _PROMPT.value.split(",")]], np.int32)
  try:
    generated = sleep_jax.generate(
      model,
      prompt,
      sleep_config=sleep,
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      rng=jax.random.key(_SEED.value),
    )
  except ValueError as e:
    logger.error("%s", e)
    sys.exit(1)
  print("generated:", ",".join(str(t) for t in np.asarray(generated)[0]))


if __name__ == "__main__":
  app.run(main)
