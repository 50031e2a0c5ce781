"""Stream a trained run's (or a converted checkpoint's) model, waking and sleeping as it would online.

  python launch/generate.py --workdir=runs/first_look/n4/depth2/seed0
      # held-out examples of the run's task, streamed; the answers it predicts, and its accuracy
      # beside the batch evaluation (`apply`) of the same examples
  python launch/generate.py --workdir=runs/x --prompt=1,0,1,1,0 --max_new_tokens=20 [--temperature=0.7]
      # free generation after a prompt of token ids
  python launch/generate.py --workdir=runs/gsm --prompt_text="Q: ..." --max_new_tokens=64 \\
      --temperature=0.8 --top_p=0.95 [--tokenizer=tokenizer.json]
      # text in, text out, printed as it is generated; stops at the tokenizer's end token
  python launch/generate.py --workdir=ckpt/jet2b --passes=4 --window=2000 --prompt_text="..."
      # a launch/convert.py directory (model.json + params/): give the sleep schedule

The stream uses the run's own sleep config (passes N, window L, eviction; --passes, --window and
--eviction override it, and a converted checkpoint, which has none, needs --window): every fed
token is one wake pass over the window's KV cache and the fast weights, and every full window is
slept on (N passes) and evicted, so memory stays constant however long the stream runs.

The tokenizer (text prompts): --tokenizer, else the workdir's tokenizer.json, else the run's
task.tokenizer. Its ids must fit the model's vocabulary.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sleep_jax import xla_flags

xla_flags.apply_defaults()  # before JAX starts its backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import sleep_jax  # noqa: E402
from sleep_jax import console, paths, rundir  # noqa: E402
from sleep_jax.data import gsm_task, tasks  # noqa: E402
from sleep_jax.model.config import ModelConfig  # noqa: E402
from sleep_jax.sleep.config import SleepConfig  # noqa: E402
from sleep_jax.sleep.generate import generate_stream  # noqa: E402
from sleep_jax.train import checkpoint  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory, or a converted checkpoint.")
_EXAMPLES = flags.DEFINE_integer("examples", 4, "Held-out examples to stream (without a prompt).")
_PROMPT = flags.DEFINE_string("prompt", None, "Comma-separated token ids to generate after.")
_PROMPT_TEXT = flags.DEFINE_string("prompt_text", None, "Text to generate after (a tokenizer).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer.json (default: see above).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate after the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample within the nucleus of this probability.")
_STOP = flags.DEFINE_string(
  "stop_tokens", None, "Comma-separated ids that end generation (default: the tokenizer's end)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_PASSES = flags.DEFINE_integer("passes", None, "Override sleep.passes (N).")
_WINDOW = flags.DEFINE_integer("window", None, "Override sleep.window (L).")
_EVICTION = flags.DEFINE_enum("eviction", None, ["hard", "sliding"], "Override sleep.eviction.")
flags.mark_flags_as_required(["workdir"])

logger = logging.getLogger("sleep_jax.launch")
TOKENIZER_FILE = "tokenizer.json"


def load_converted(directory: str):
  """The model of a launch/convert.py directory (model.json + params/), on one device."""
  model_config = ModelConfig(
    **json.loads(paths.read_text(paths.join(directory, checkpoint.INITIAL_MODEL_FILE)))
  )
  abstract = nnx.eval_shape(lambda: sleep_jax.build_model(model_config, seed=0))
  graphdef, abstract_params = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    nnx.to_pure_dict(abstract_params),
  )
  nnx.replace_by_pure_dict(
    abstract_params, checkpoint.load_initial(directory, model_config, target)
  )
  return nnx.merge(graphdef, abstract_params)


def load(workdir: str):
  """(model, sleep config or None, task config or None, a line naming what was loaded)."""
  if paths.exists(paths.join(workdir, checkpoint.INITIAL_MODEL_FILE)):
    return load_converted(workdir), None, None, f"{workdir}: converted checkpoint"
  model, config, step = checkpoint.restore_model(workdir)
  return model, config.sleep, config, f"{workdir}: step {step}"


def sleep_schedule(saved) -> SleepConfig:
  """The run's sleep config with the flags' overrides (context_len plays no part in a stream)."""
  fields = {} if saved is None else dict(SleepConfig.from_config(saved).__dict__)
  fields.update(context_len=0, predict_chunks=None)
  for name, flag in (("passes", _PASSES), ("window", _WINDOW), ("eviction", _EVICTION)):
    if flag.value is not None:
      fields[name] = flag.value
  if saved is None and _WINDOW.value is None:
    raise ValueError(
      "a converted checkpoint carries no sleep schedule: give --window (and --passes)"
    )
  return SleepConfig(**fields)


def load_tokenizer(workdir: str, config, vocab_size: int):
  """The tokenizer for text prompts (see the module docstring), checked against the model."""
  path = _TOKENIZER.value
  if path is None and paths.exists(paths.join(workdir, TOKENIZER_FILE)):
    path = paths.join(workdir, TOKENIZER_FILE)
  if path is None and config is not None and getattr(config.task, "tokenizer", None):
    path = gsm_task.tokenizer_path(config.task.tokenizer)
  if path is None:
    raise ValueError(
      f"--prompt_text needs a tokenizer: --tokenizer=tokenizer.json, or a {TOKENIZER_FILE} in "
      f"{workdir}"
    )
  tokenizer = gsm_task.load_tokenizer(path)
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(
      f"the tokenizer {path} has {size} ids but the model's vocabulary holds {vocab_size}: "
      "it is not this model's tokenizer"
    )
  return tokenizer


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


def generate(model, sleep: SleepConfig, prompt: list[int], tokenizer, stop_tokens) -> None:
  """Generates after one prompt, printing each token (or its text) as it comes."""
  steps = generate_stream(
    model,
    [prompt],
    sleep_config=sleep,
    max_new_tokens=_MAX_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    stop_tokens=stop_tokens,
    seed=_SEED.value,
  )
  generated, shown = [], ""
  print("generated: " if tokenizer is None else "", end="", flush=True)
  for (token,) in steps:
    if token < 0:
      break
    generated.append(int(token))
    if tokenizer is None:
      print(("," if len(generated) > 1 else "") + str(token), end="", flush=True)
      continue
    # Decode everything so far and print what is new: a character may span several tokens.
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if text.startswith(shown):
      print(text[len(shown) :], end="", flush=True)
      shown = text
  print(flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure(verbosity=None)
  workdir = _WORKDIR.value
  try:
    model, saved_sleep, config, what = load(workdir)
    if _PROMPT.value is None and _PROMPT_TEXT.value is None:
      if config is None:
        raise ValueError("a converted checkpoint has no task: give --prompt or --prompt_text")
      sleep = config.sleep
    else:
      sleep = sleep_schedule(saved_sleep)
    print(
      f"{what}, N={sleep.passes}, L={sleep.window}, {sleep.eviction} eviction, "
      f"{jax.devices()[0].platform}",
      flush=True,
    )
    if _PROMPT.value is None and _PROMPT_TEXT.value is None:
      stream_examples(model, config, _EXAMPLES.value)
      return
    tokenizer, stop_tokens = None, []
    if _PROMPT_TEXT.value is not None:
      if _PROMPT.value is not None:
        raise ValueError("give --prompt (token ids) or --prompt_text, not both")
      tokenizer = load_tokenizer(workdir, config, model.cfg.vocab_size)
      prompt = tokenizer.encode(_PROMPT_TEXT.value, add_special_tokens=False).ids
      if not prompt:
        raise ValueError(f"--prompt_text={_PROMPT_TEXT.value!r} encodes to no tokens")
      try:
        stop_tokens = [gsm_task.special_ids(tokenizer)[1]]
      except ValueError:
        stop_tokens = []  # a tokenizer without an end token: run to --max_new_tokens
    else:
      prompt = [int(t) for t in _PROMPT.value.split(",") if t.strip()]
    if _STOP.value is not None:
      stop_tokens = [int(t) for t in _STOP.value.split(",") if t.strip()]
    generate(model, sleep, prompt, tokenizer, stop_tokens)
  except (ValueError, rundir.WorkdirError, FileNotFoundError) as e:
    logger.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
