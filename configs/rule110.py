"""Rule 110 with a sleeping hybrid (PAPER.md section 4; paper Fig. 2).

Variants (`--config=configs/rule110.py:<variant>`):
  paper (default)  the paper's model and batch: d_model 256, "AGAG", depth t=32, batch 512.
                   Expect ~10% exact accuracy at N=1 and >30% at N=3..4 after ~5B tokens.
                   Runs the sleep loops unrolled and without remat (for GPUs and TPUs:
                   common.accelerator_execution).
  paper_bf16       paper with bfloat16 matmuls (mixed precision; logits within 1e-2 of
                   float32's).
  cpu              sized for a 2-core CPU (~10 minutes at N=1): d_model 128, batch 64, depth 2.
                   Learns the task well past chance (1/16) at N=1.
  tiny             a few steps of a toy model, for tests.

Run:
  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/rule110_cpu
  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/n2 \
      --config.sleep.passes=2 --config.task.depth=4
  python launch/main.py --config=configs/rule110.py:cpu --workdir=runs/mixed \
      --config.task.depths=0,2,4 --config.task.eval_depths=0,2,4 --config.model.vocab_size=12

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
  task = config_dict.ConfigDict()
  task.name = "rule110"  # the task registry key (sleep_jax.data.tasks.TASKS)
  task.depth = 32  # t: Rule 110 steps between the strings and their labels
  # Mixed depths: when non-empty, each training (and main held-out) example draws its own t
  # uniformly from these distinct depths and task.depth is unused, e.g. (0, 2, 4) to ask
  # whether adaptive sleep (sleep.halt) spends more passes on deeper examples. Per-depth scores
  # come from task.eval_depths (among task.depths), as for a single depth. Each depth writes
  # its cells in its own two tokens, so set model.vocab_size to 6 + 2 * len(task.depths).
  task.depths = ()
  # Also evaluate at these depths (held-out sets of their own; keys "depth{t}/exact_accuracy",
  # "depth{t}/loss", "depth{t}/accuracy"), e.g. to see how far a model trained at t generalises.
  task.eval_depths = (1, 2, 4, 8)
  c = common.experiment(
    task,
    vocab_size=rule110.VOCAB_SIZE,  # 0/1 cells and the four query tokens
    window=rule110.STRING_LEN,  # L = 24: one string per window
    context_len=rule110.CONTEXT_LEN,  # 96 tokens slept on before the 4 queries
    batch_size=512,
    eval_examples=4_096,
    eval_slice_examples=1_024,
    eval_batch_size=512,
  )
  # 100k steps: ~5B tokens at 100 tokens per example, as in the paper.

  if variant in ("paper", "paper_bf16"):
    common.accelerator_execution(c, bfloat16=variant == "paper_bf16")
  elif variant == "cpu":
    c.task.depth = 2
    c.model.d_model, c.model.head_dim, c.model.mlp_dim = 128, 32, 512
    c.train.batch_size = 64
    common.short_run(c, num_steps=400, eval_every=100, log_every=10)
    c.eval.num_examples, c.eval.num_slice_examples, c.eval.batch_size = 1_024, 256, 256
  elif variant == "tiny":
    c.task.depth = 1
    c.task.eval_depths = (1, 3)  # two small slices: the per-depth path at almost no cost
    common.tiny_model(c)
    c.train.batch_size = 16
    common.short_run(c, num_steps=4, eval_every=2, log_every=1)
    c.eval.num_examples, c.eval.num_slice_examples, c.eval.batch_size = 32, 16, 16
  else:
    raise ValueError(
      f"unknown rule110 config variant {variant!r}; use paper, paper_bf16, cpu or tiny"
    )
  return c
