"""GSM-Infinite, question first and no chain of thought (PAPER.md section 4, experiment 3).

The paper fine-tunes pretrained hybrids (Jet-Nemotron-2B, Ouro-1.4B) on it; their ports are
not in the project yet (issue 13), so these variants train the small hybrid from scratch with
a word-level tokenizer built from the generator's vocabulary. With a checkpoint's tokenizer,
set --config.task.tokenizer=/path/to/tokenizer.json and model.vocab_size to its size.

Variants (`--config=configs/gsm_infinite.py:<variant>`):
  cpu    sized for a 2-core CPU: symbolic problems of 1-4 operations, one distractor chain,
         384-token examples (5 windows of 64 slept on, the answer in the sixth), d_model 128,
         evaluated per operation count 2 and 4. A pipeline check, not a result.
  tiny   a few steps of a toy model, for tests.

  python launch/main.py --config=configs/gsm_infinite.py:cpu --workdir=runs/gsm_cpu \\
      --config.sleep.passes=2
"""

from ml_collections import config_dict

from configs import common

WORD_LEVEL_VOCAB = 128  # >= the word-level tokenizer's size (sleep_jax.data.gsm_task)


def get_config(variant: str | None = None) -> config_dict.ConfigDict:
  variant = variant or "cpu"
  task = config_dict.ConfigDict()
  task.name = "gsm_infinite"  # the task registry key (sleep_jax.data.tasks.TASKS)
  task.tokenizer = "word_level"  # or a checkpoint's tokenizer.json
  task.family = "symbolic"  # or "realistic" (iGSM-style word problems)
  task.ops = (1, 4)  # training operation counts, inclusive
  task.eval_ops = (2, 4)  # per-count held-out sets ("ops{k}/accuracy": the whole answer right)
  task.seq_len = 384  # left-padded; a multiple of predict_len
  task.predict_len = 64  # the last window, holding the answer (= sleep.window)
  task.target_length = config_dict.placeholder(int)  # noise padding in tokens (paper 2,000+)
  task.distractors = 1  # distractor chains per problem
  task.modulus = config_dict.placeholder(int)  # None: plain integers
  c = common.experiment(
    task,
    vocab_size=WORD_LEVEL_VOCAB,
    window=64,
    context_len=384 - 64,
    batch_size=32,
    eval_examples=256,
    eval_slice_examples=128,
    eval_batch_size=64,
  )
  c.model.d_model, c.model.head_dim, c.model.mlp_dim = 128, 32, 512
  if variant == "cpu":
    common.short_run(c, num_steps=300, eval_every=100, log_every=10)
  elif variant == "tiny":
    common.tiny_model(c)
    c.task.seq_len, c.task.predict_len, c.task.eval_ops = 256, 64, (2,)
    c.sleep.context_len = 192
    c.train.batch_size = 16
    common.short_run(c, num_steps=2, eval_every=2, log_every=1)
    c.eval.num_examples, c.eval.num_slice_examples, c.eval.batch_size = 16, 16, 16
  else:
    raise ValueError(f"unknown gsm_infinite config variant {variant!r}; use cpu or tiny")
  return c
