"""Rule 110 with a sleeping hybrid (PAPER.md section 4; paper Fig. 2).

Variants (`--config=configs/rule110.py:<variant>`):
  paper (default)  the paper's model and batch: d_model 256, "AGAG", depth t=32, batch 512.
                   Expect ~10% exact accuracy at N=1 and >30% at N=3..4 after ~5B tokens.
  cpu              sized for a 2-core CPU (~10 minutes at N=1): d_model 128, batch 64, depth 2.
                   Learns the task well past chance (1/16) at N=1.
  tiny             a few steps of a toy model, for tests.

Run:
  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/rule110_cpu
  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/n2 \
      --config.sleep.passes=2 --config.task.depth=4

Baselines (same data order and evaluation, as overrides):
  attention only (hard eviction, sits at chance)  --config.model.pattern=AAAA
  full attention, no eviction (upper reference)   --config.sleep.eviction=none
  compute-matched N=1   --config.train.num_steps=<steps * training_flops_ratio(N, ...)>
                        (sleep_jax/sleep/config.py: tokens through the stack relative to N=1)
"""

from ml_collections import config_dict

from configs import common

from sleep_jax.data import rule110


def get_config(variant: str | None = None) -> config_dict.ConfigDict:
  variant = variant or "paper"
  c = config_dict.ConfigDict()
  c.seed = 0  # one seed for parameters, data order and dropout-free training keys

  c.task = config_dict.ConfigDict()
  c.task.name = "rule110"  # the task registry key (sleep_jax.data.tasks.TASKS)
  c.task.depth = 32  # t: Rule 110 steps between the strings and their labels
  # Also evaluate at these depths (held-out sets of their own; keys "depth{t}/exact_accuracy",
  # "depth{t}/loss", "depth{t}/accuracy"), e.g. to see how far a model trained at t generalises.
  c.task.eval_depths = (1, 2, 4, 8)

  c.model = config_dict.ConfigDict()
  c.model.vocab_size = rule110.VOCAB_SIZE  # 0/1 cells and the four query tokens
  c.model.pattern = "AGAG"  # blocks in order: "A" attention, "G" gated-delta (fast weights)
  c.model.d_model = 256  # residual width
  c.model.num_heads = 4  # heads of attention and of the gated-delta mixer
  c.model.head_dim = 64  # per-head width; the fast state per head is head_dim x head_dim
  c.model.mlp_dim = 1024  # SwiGLU hidden width
  c.model.conv_width = 4  # short causal conv on q, k, v of the gated-delta mixer
  c.model.rope_base = 10_000.0  # rotary wavelength base (positions restart every chunk)
  c.model.fast_weight_impl = "auto"  # pallas on GPU/TPU, chunked on CPU; or reference/chunked/pallas
  c.model.dtype = "float32"  # compute dtype of activations (params and fast state: float32)

  c.sleep = config_dict.ConfigDict()
  c.sleep.passes = 1  # N: passes of the stack over every evicted window (1 = plain hybrid)
  c.sleep.window = rule110.STRING_LEN  # L = 24: one string per window
  # "hard": drop the whole KV cache after every window. "none": the full-attention reference
  # (one pass over the whole sequence, no sleep; passes must be 1).
  c.sleep.eviction = "hard"
  c.sleep.context_len = rule110.CONTEXT_LEN  # 96 tokens slept on before the 4 queries
  c.sleep.grad_passes = config_dict.placeholder(int)  # backprop the last k passes; None = all
  c.sleep.remat = True  # jax.checkpoint per pass: faster here and far less memory

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 512  # global batch (split over data x fsdp devices of all processes)
  c.train.num_steps = 100_000  # ~5B tokens at 100 tokens/example
  c.train.warmup_steps = 1_000  # linear warmup, then cosine decay to min_lr_ratio
  c.train.min_lr_ratio = 0.1  # final learning rate / peak learning rate
  c.train.muon_lr = 2e-3  # Muon: hidden 2-D weight matrices (tuned at N=1, reused for all N)
  c.train.adamw_lr = 5e-5  # AdamW: embeddings, head, norms, conv filters, gates
  c.train.weight_decay = 0.0  # decoupled weight decay of both groups (paper: unstated)
  c.train.grad_clip = 1.0  # clip the global gradient norm

  c.eval = config_dict.ConfigDict()
  c.eval.every_steps = 1_000  # evaluate on the held-out set every this many steps (and at the end)
  c.eval.num_examples = 4_096  # size of the fixed held-out set
  c.eval.batch_size = 512
  c.eval.num_slice_examples = 1_024  # size of each per-depth held-out set (task.eval_depths)

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 1_000  # save train state + data iterator (and at the end)
  c.checkpoint.max_to_keep = 2

  c.log_every_steps = 50  # console line and TensorBoard scalars

  c.parallel = common.parallel()  # mesh (data, fsdp, tensor) and sharding rules

  if variant == "paper":
    pass
  elif variant == "cpu":
    c.task.depth = 2
    c.model.d_model, c.model.head_dim, c.model.mlp_dim = 128, 32, 512
    c.train.batch_size = 64  # ~1.3 s/step on 2 cores at N=1 (the gated-delta blocks dominate)
    c.train.num_steps = 400
    c.train.warmup_steps = 40
    c.train.adamw_lr = 3e-3  # a short run needs a larger AdamW rate than the paper's 5e-5
    c.eval.every_steps = 100
    c.eval.num_examples = 1_024
    c.eval.batch_size = 256
    c.eval.num_slice_examples = 256
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
  elif variant == "tiny":
    c.task.depth = 1
    c.model.d_model, c.model.num_heads, c.model.head_dim, c.model.mlp_dim = 32, 2, 16, 64
    c.train.batch_size = 16
    c.train.num_steps = 4
    c.train.warmup_steps = 1
    c.eval.every_steps = 2
    c.eval.num_examples = 32
    c.eval.batch_size = 16
    c.eval.num_slice_examples = 16
    c.task.eval_depths = (1, 3)  # two small slices: the per-depth path at almost no cost
    c.checkpoint.every_steps = 2
    c.log_every_steps = 1
  else:
    raise ValueError(f"unknown rule110 config variant {variant!r}; use paper, cpu or tiny")
  return c
