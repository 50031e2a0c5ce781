"""Depo k-hop retrieval with a sleeping hybrid (PAPER.md section 4; paper Fig. 3).

Variants (`--config=configs/depo.py:<variant>`):
  paper (default)  the paper's setting: d_model 256 "AGAG", window 75 (the whole 300-token cycle
                   is evicted before the queries), k ~ U{1..16} in training, batch 128, 100k
                   steps. Expect (test loss per k): every N learns k = 1, 2; N=1 barely moves
                   for k >= 4; N=2 stalls at k >= 8; only N=4 starts to improve at k = 16.
  cpu              sized for a 2-core CPU (a few minutes at N=1): d_model 64, batch 16, 200 steps.
                   A pipeline check, not a result: the paper needs ~100k steps.
  tiny             a few steps of a toy model, for tests.

Run:
  python launch/main.py --config=configs/depo.py:cpu --workdir=runs/depo_cpu
  python launch/main.py --config=configs/depo.py --workdir=runs/depo_n4 --config.sleep.passes=4

Baselines (same data order and evaluation, as overrides):
  attention only (hard eviction, sits at chance)  --config.model.pattern=AAAA
  full attention, no eviction (upper reference)   --config.sleep.eviction=none
  compute-matched N=1   --config.train.num_steps=<steps * training_flops_ratio(N, ...)>
                        (sleep_jax/sleep/config.py: tokens through the stack relative to N=1)
"""

from ml_collections import config_dict

from configs import common

from sleep_jax.data import depo


def get_config(variant: str | None = None) -> config_dict.ConfigDict:
  variant = variant or "paper"
  c = config_dict.ConfigDict()
  c.seed = 0  # one seed for parameters, data order and dropout-free training keys

  c.task = config_dict.ConfigDict()
  c.task.name = "depo"  # the task registry key (sleep_jax.data.tasks.TASKS)
  c.task.hops = config_dict.placeholder(int)  # k of every training query; None = k ~ U{1..16}
  c.task.min_nodes = depo.MIN_NODES  # 10: smallest cycle (node count ~ U{min..max} per example)
  c.task.max_nodes = depo.MAX_NODES  # 75: largest cycle (fills the 300 context tokens)
  # Also evaluate with every query at these k (held-out sets of their own; keys "hops{k}/loss"
  # = answer-token loss, "hops{k}/accuracy" = exact answer-word accuracy).
  c.task.eval_hops = depo.EVAL_HOPS  # (1, 2, 4, 8, 16) as in the paper

  c.model = config_dict.ConfigDict()
  c.model.vocab_size = depo.VOCAB_SIZE  # 118: 100 word symbols, HOP_1..HOP_16, ANS, PAD
  c.model.pattern = "AGAG"  # blocks in order: "A" attention, "G" gated-delta (fast weights)
  c.model.d_model = 256  # residual width
  c.model.num_heads = 4  # heads of attention and of the gated-delta mixer
  c.model.head_dim = 64  # per-head width; the fast state per head is head_dim x head_dim
  c.model.mlp_dim = 1024  # SwiGLU hidden width
  c.model.conv_width = 4  # short causal conv on q, k, v of the gated-delta mixer
  c.model.rope_base = 10_000.0  # rotary wavelength base (positions restart every chunk)
  c.model.fast_weight_impl = "auto"  # gated_delta_rule impl: the best one for the platform
  c.model.dtype = "float32"  # compute dtype of activations (params and fast state: float32)

  c.sleep = config_dict.ConfigDict()
  c.sleep.passes = 1  # N: passes of the stack over every evicted window (1 = plain hybrid)
  c.sleep.window = 75  # L: the 300-token context is 4 windows; the 60 query tokens predict
  # "hard": drop the whole KV cache after every window. "none": the full-attention reference
  # (one pass over the whole sequence, no sleep; passes must be 1).
  c.sleep.eviction = "hard"
  c.sleep.context_len = depo.CONTEXT_LEN  # 300 tokens slept on before the queries
  c.sleep.grad_passes = config_dict.placeholder(int)  # backprop the last k passes; None = all
  c.sleep.remat = True  # jax.checkpoint per pass: far less memory for large N

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 128  # global batch (split over data x fsdp devices of all processes)
  c.train.num_steps = 100_000  # the paper's 100k steps (~4.6B tokens at 360 tokens/example)
  c.train.warmup_steps = 1_000  # linear warmup, then cosine decay to min_lr_ratio
  c.train.min_lr_ratio = 0.1  # final learning rate / peak learning rate
  c.train.muon_lr = 2e-3  # Muon: hidden 2-D weight matrices (tuned at N=1, reused for all N)
  c.train.adamw_lr = 5e-5  # AdamW: embeddings, head, norms, conv filters, gates
  c.train.weight_decay = 0.0  # decoupled weight decay of both groups (paper: unstated)
  c.train.grad_clip = 1.0  # clip the global gradient norm

  c.eval = config_dict.ConfigDict()
  c.eval.every_steps = 1_000  # evaluate on the held-out sets every this many steps (and at the end)
  c.eval.num_examples = 2_048  # size of the fixed held-out set with mixed k ~ U{1..16}
  c.eval.num_slice_examples = 512  # size of each per-k held-out set (task.eval_hops)
  c.eval.batch_size = 128

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 1_000  # save train state + data iterator (and at the end)
  c.checkpoint.max_to_keep = 2

  c.log_every_steps = 50  # console line and TensorBoard scalars

  c.parallel = common.parallel()  # mesh (data, fsdp, tensor) and sharding rules

  if variant == "paper":
    pass
  elif variant == "cpu":
    c.model.d_model, c.model.head_dim, c.model.mlp_dim = 64, 16, 256
    c.train.batch_size = 16  # ~1.2 s/step on 2 shared cores at N=1: ~5 min per run with evals
    c.train.num_steps = 200
    c.train.warmup_steps = 20
    c.train.adamw_lr = 3e-3  # a short run needs a larger AdamW rate than the paper's 5e-5
    c.eval.every_steps = 100
    c.eval.num_examples = 128  # small sets: an eval of all six costs ~10 training steps
    c.eval.num_slice_examples = 64
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
  elif variant == "tiny":
    c.model.d_model, c.model.num_heads, c.model.head_dim, c.model.mlp_dim = 32, 2, 16, 64
    c.train.batch_size = 16
    c.train.num_steps = 2
    c.train.warmup_steps = 1
    c.task.eval_hops = (1, 16)
    c.eval.every_steps = 2
    c.eval.num_examples = 16
    c.eval.num_slice_examples = 16
    c.eval.batch_size = 16
    c.checkpoint.every_steps = 2
    c.log_every_steps = 1
  else:
    raise ValueError(f"unknown depo config variant {variant!r}; use paper, cpu or tiny")
  return c
