"""The config sections every task shares, each field commented once (big_vision style).

A task config (configs/rule110.py, configs/depo.py) calls `experiment(...)` with its task
section and its sequence layout, then sets what its variants change. Every section becomes a
typed, validated dataclass when a run loads it (sleep_jax/train/config.py), so a typo in an
override or a bad value fails before anything is compiled.

Imported by the task configs as `from configs import common` (launch/ and tests put the
repository root on the path).
"""

from ml_collections import config_dict

from sleep_jax.parallel import config as parallel_config


def model(vocab_size: int) -> config_dict.ConfigDict:
  """`config.model`: the hybrid LM (sleep_jax/model)."""
  c = config_dict.ConfigDict()
  c.vocab_size = vocab_size
  c.pattern = "AGAG"  # blocks in order: "A" attention, "G" gated-delta (fast weights)
  c.d_model = 256  # residual width
  c.num_heads = 4  # heads of attention and of the gated-delta mixer
  c.head_dim = 64  # per-head width; the fast state per head is head_dim x head_dim
  c.mlp_dim = 1024  # SwiGLU hidden width
  c.conv_width = 4  # short causal conv on q, k, v of the gated-delta mixer
  c.rope_base = 10_000.0  # rotary wavelength base (positions restart every chunk)
  # The gated_delta_rule kernel: "auto" = Mosaic on TPU, Triton on GPU, the XLA chunked form on
  # CPU (chosen for the platform being compiled for); or "reference", "chunked", "pallas".
  c.fast_weight_impl = "auto"
  # Causal attention within a chunk: "auto" = the fused Triton kernel on GPUs where a window
  # fits it (sleep_jax/ops/attention), XLA elsewhere; or "xla", "reference", "pallas".
  c.attention_impl = "auto"
  c.dtype = "float32"  # compute dtype of activations (params and fast state: float32)
  return c


def sleep(*, window: int, context_len: int) -> config_dict.ConfigDict:
  """`config.sleep`: how the context is consolidated (sleep_jax/sleep)."""
  c = config_dict.ConfigDict()
  c.passes = 1  # N: passes of the stack over every evicted window (1 = the plain hybrid)
  c.window = window  # L: the attention window; must tile context_len
  # "hard": drop the whole KV cache after every window. "sliding" (paper section 6.4): keep
  # the KV of the window's last L-1 tokens visible to the next window under a sliding mask.
  # "none": the full-attention reference (one pass over the whole sequence; passes must be 1).
  c.eviction = "hard"
  c.context_len = context_len  # tokens slept on before the first predicted chunk
  # Chunks with loss (indices; None = every chunk after context_len), and whether a predicted
  # chunk is also slept on (LM training with loss everywhere) (sleep_jax/sleep/config.py).
  c.predict_chunks = config_dict.placeholder(tuple)
  c.predict_then_sleep = False
  # The short convolutions' state at a chunk boundary: "reset" (the paper's convention) or
  # "carry" (the previous chunk's last-pass tails).
  c.conv_state = "reset"
  c.grad_passes = config_dict.placeholder(int)  # backprop the last k passes; None = all
  c.remat = True  # jax.checkpoint per pass: faster on the CPU and far less memory for large N
  # Loops over chunks and passes as straight-line code: far fewer GPU kernel launches, a longer
  # compile (sleep_jax/sleep/config.py).
  c.unroll = False
  # Adaptive sleep (beyond the paper): "never" (every window gets `passes`), "converge" (a row
  # stops on a window once its fast state's relative change falls below halt_tol) or "learned"
  # (a halting unit trained with ponder_cost: adaptive computation time; the model gets the
  # unit). Under either, `passes` is the most a window gets (sleep_jax/sleep/config.py).
  c.halt = "never"
  c.halt_tol = 0.0
  c.ponder_cost = 0.0
  return c


def train(*, batch_size: int) -> config_dict.ConfigDict:
  """`config.train`: optimisation (sleep_jax/train/optim.py)."""
  c = config_dict.ConfigDict()
  c.batch_size = batch_size  # global batch (split over data x fsdp devices of all processes)
  c.num_steps = 100_000  # the paper's training length
  # (ours) marks a choice the paper does not state (README, "Where the paper is silent").
  c.warmup_steps = 1_000  # (ours) linear warmup, then cosine decay to min_lr_ratio
  c.min_lr_ratio = 0.1  # (ours) final learning rate / peak learning rate
  c.muon_lr = 2e-3  # Muon: hidden 2-D weight matrices (tuned at N=1, reused for all N)
  c.adamw_lr = 5e-5  # AdamW: embeddings, head, norms; (ours) conv filters, gates, A_log, dt_bias
  c.weight_decay = 0.0  # (ours) decoupled weight decay of both groups (paper: unstated)
  c.grad_clip = 1.0  # (ours) clip the global gradient norm
  c.trainable = ""  # regex on parameter paths: only those train ("": all), e.g. new layers
  return c


def evaluation(
  *, num_examples: int, num_slice_examples: int, batch_size: int
) -> config_dict.ConfigDict:
  """`config.eval`: held-out sets (fixed per seed, independent of the training stream)."""
  c = config_dict.ConfigDict()
  c.every_steps = 1_000  # evaluate every this many steps (and at the end)
  c.num_examples = num_examples  # size of the main held-out set
  c.num_slice_examples = num_slice_examples  # size of each per-depth / per-hop held-out set
  c.batch_size = batch_size  # both sizes are whole multiples of it
  return c


def checkpoint() -> config_dict.ConfigDict:
  """`config.checkpoint`: orbax checkpoints of the train state and the data position."""
  c = config_dict.ConfigDict()
  c.every_steps = 1_000  # save every this many steps (and at the end, and on SIGTERM)
  c.max_to_keep = 2
  return c


def parallel() -> config_dict.ConfigDict:
  """`config.parallel`: the device mesh and how parameters are split over it.

  The mesh axes (sleep_jax/parallel/mesh.py): `data` splits the batch; `fsdp` splits the batch
  and the parameters (and their optimizer state); `tensor` splits heads and the MLP width.
  Sizes multiply to the number of devices of the whole job (every process); one may be -1
  (the rest). Examples: FSDP over 8 devices `--config.parallel.mesh.data=1
  --config.parallel.mesh.fsdp=8`; 2-way tensor parallelism `--config.parallel.mesh.tensor=2`.
  """
  c = config_dict.ConfigDict()
  c.mesh = config_dict.ConfigDict(dict(parallel_config.DEFAULT_MESH))  # data -1: the rest
  # Logical axis -> mesh axes, one pair per parameter dimension kind (the table and its
  # meaning: sleep_jax/parallel/config.py).
  c.rules = parallel_config.DEFAULT_RULES
  return c


def experiment(
  task: config_dict.ConfigDict,
  *,
  vocab_size: int,
  window: int,
  context_len: int,
  batch_size: int,
  eval_examples: int,
  eval_slice_examples: int,
  eval_batch_size: int,
) -> config_dict.ConfigDict:
  """A whole experiment config at the paper's scale, for `task` and its sequence layout."""
  c = config_dict.ConfigDict()
  c.seed = 0  # parameters, data order and held-out sets
  c.task = task
  c.model = model(vocab_size)
  c.sleep = sleep(window=window, context_len=context_len)
  c.train = train(batch_size=batch_size)
  c.eval = evaluation(
    num_examples=eval_examples, num_slice_examples=eval_slice_examples, batch_size=eval_batch_size
  )
  c.checkpoint = checkpoint()
  c.log_every_steps = 50  # console line, train_log.jsonl and TensorBoard scalars
  c.parallel = parallel()
  # Start from saved parameters (launch/convert.py output, or a run's workdir); "": fresh.
  c.init_from = ""
  return c


def short_run(
  c: config_dict.ConfigDict, *, num_steps: int, eval_every: int, log_every: int
) -> None:
  """Shared changes of the CPU-sized variants: a short schedule and frequent bookkeeping."""
  c.train.num_steps = num_steps
  c.train.warmup_steps = max(num_steps // 10, 1)
  c.train.adamw_lr = 3e-3  # a short run needs a larger AdamW rate than the paper's 5e-5
  c.eval.every_steps = eval_every
  c.checkpoint.every_steps = eval_every
  c.log_every_steps = log_every


def accelerator_execution(c: config_dict.ConfigDict, *, bfloat16: bool = False) -> None:
  """How the paper-scale variants run on GPUs and TPUs (the same function of the parameters).

  The loops over chunks and passes are unrolled and nothing is rematerialised: the Rule 110
  step then launches a third of the GPU kernels it did (3,065 -> ~1,000 at N=1,
  bench/train_step.py) for 6 GiB at N=1 and 25 GiB at N=4 on one GPU at batch 512. With
  `bfloat16`, the matmuls multiply in bfloat16 (mixed precision, `ResidualBlock`).
  """
  c.sleep.unroll = True
  c.sleep.remat = False
  if bfloat16:
    c.model.dtype = "bfloat16"


def tiny_model(c: config_dict.ConfigDict) -> None:
  """A toy model for tests: a few steps compile and run in seconds."""
  c.model.d_model, c.model.num_heads, c.model.head_dim, c.model.mlp_dim = 32, 2, 16, 64
