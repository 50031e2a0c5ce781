"""GSM-Infinite, question first and no chain of thought (PAPER.md section 4, experiment 3).

Variants (`--config=configs/gsm_infinite.py:<variant>`):
  cpu    the small hybrid from scratch, sized for a 2-core CPU: symbolic problems of 1-4
         operations, 384-token examples (5 windows of 64 slept on, the answer in the sixth),
         a word-level tokenizer from the generator's vocabulary. A pipeline check, not a result.
  tiny   a few steps of a toy model, for tests.
  The paper's fine-tunes (pretrained weights converted by launch/convert.py, given by
  --config.init_from; the checkpoint's tokenizer by --config.task.tokenizer=<tokenizer.json>):
  jet_nemotron_2b  Jet-Nemotron-2B, the middle 14 of 28 blocks looped (loop_start=7,
         loop_stop=21), hard eviction L=2000, N in {1, 2, 4, 6} by --config.sleep.passes.
  ouro_1_4b  Ouro-1.4B with 6 inserted MLP-free Jet layers, every block looped, hard L=2000,
         N in {1, 2, 4}.
  ouro_1_4b_warmup  the sliding-eviction recipe's first stage: only the inserted layers train
         (train.trainable), hard eviction L=512, one epoch.
  ouro_1_4b_sliding  the second stage: everything trains, sliding eviction L=512, two epochs,
         --config.init_from=<the warm-up run's workdir>.
  tiny_pretrained  a tiny Jet-Nemotron-layout model for the CPU (tests convert a random one).

  python launch/main.py --config=configs/gsm_infinite.py:cpu --workdir=runs/gsm_cpu \\
      --config.sleep.passes=2
  python launch/convert.py --checkpoint=/models/Jet-Nemotron-2B --out=ckpt/jet2b \\
      --option=loop_start=7 --option=loop_stop=21
  python launch/main.py --config=configs/gsm_infinite.py:jet_nemotron_2b --workdir=runs/jet_n4 \\
      --config.init_from=ckpt/jet2b --config.task.tokenizer=/models/Jet-Nemotron-2B/tokenizer.json \\
      --config.sleep.passes=4

(ours) Where the paper is silent: one epoch is EPOCH_EXAMPLES problems (the paper does not
give its training set size); the answer sits in the last window of a 4,000-token (L=2000) or
4,096-token (L=512) left-padded sequence; Ouro's Jet layers sit after every 4th block.
"""

from ml_collections import config_dict

from configs import common
from third_party import jet_nemotron, ouro

WORD_LEVEL_VOCAB = 128  # >= the word-level tokenizer's size (sleep_jax.data.gsm_task)
EPOCH_EXAMPLES = 51_200  # (ours) problems per epoch of the pretrained fine-tunes
TINY_JET_NEMOTRON = jet_nemotron.CONFIG_2B | {
  "hidden_size": 32,
  "num_hidden_layers": 4,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "intermediate_size": 64,
  "vocab_size": WORD_LEVEL_VOCAB,
  "layer_types": ["jet", "attn", "jet", "swa"],
  "efficient_attention_config": {
    "jet": {
      "num_heads": 2,
      "head_dim": 8,
      "expand_v": 2.0,
      "conv_size": 4,
      "dconv_generator_reduction": 4,
      "norm_eps": "1e-5",
    },
    "swa": {"window_size": 32},
  },
}


def pretrained(c, model: dict, *, window: int, seq_len: int, epochs: int) -> None:
  """The paper's fine-tuning setup for a converted checkpoint's model (PAPER.md section 4)."""
  c.model = config_dict.ConfigDict(model)
  # (ours) bfloat16 activations (the checkpoints' own dtype; parameters stay float32) and
  # blocks recomputed in the backward: at L=2000 activations, not parameters, fill a chip.
  c.model.dtype, c.model.remat_blocks = "bfloat16", True
  c.init_from = config_dict.placeholder(str)  # required: a launch/convert.py directory
  c.task.tokenizer = config_dict.placeholder(str)  # required: the checkpoint's tokenizer.json
  c.task.ops, c.task.eval_ops = (1, 8), (2, 4, 6, 8)
  c.task.seq_len, c.task.predict_len = seq_len, window
  c.task.target_length = 2000  # noise padding: the paper's 2,000-3,300-token problems
  c.sleep.window, c.sleep.context_len = window, seq_len - window
  c.train.batch_size = 256
  c.train.muon_lr = 1e-3  # the paper's Muon rate for pretrained models
  c.train.num_steps = epochs * EPOCH_EXAMPLES // 256
  c.train.warmup_steps = 20  # (ours)
  c.eval.num_examples, c.eval.num_slice_examples, c.eval.batch_size = 1600, 400, 16
  c.eval.every_steps = c.checkpoint.every_steps = 100


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
  elif variant == "jet_nemotron_2b":
    model = jet_nemotron.model_config(jet_nemotron.CONFIG_2B, loop_start=7, loop_stop=21)
    pretrained(c, model, window=2000, seq_len=4000, epochs=1)
  elif variant.startswith("ouro_1_4b"):
    model = ouro.model_config(ouro.CONFIG_1_4B, insert_jet_layers=6)
    if variant == "ouro_1_4b":
      pretrained(c, model, window=2000, seq_len=4000, epochs=1)
    elif variant == "ouro_1_4b_warmup":
      pretrained(c, model, window=512, seq_len=4096, epochs=1)
      c.train.trainable = "^blocks/4/"  # the inserted Jet layers: position 4 of "AAAAj"
    elif variant == "ouro_1_4b_sliding":
      pretrained(c, model, window=512, seq_len=4096, epochs=2)
      c.sleep.eviction = "sliding"
    else:
      raise ValueError(f"unknown gsm_infinite config variant {variant!r}")
  elif variant == "tiny_pretrained":
    pretrained(
      c,
      jet_nemotron.model_config(TINY_JET_NEMOTRON, loop_start=1, loop_stop=3),
      window=64,
      seq_len=256,
      epochs=1,
    )
    c.task.tokenizer = "word_level"
    c.task.ops, c.task.eval_ops, c.task.target_length = (1, 2), (2,), None
    c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 8, 3, 0
    c.eval.num_examples, c.eval.num_slice_examples, c.eval.batch_size = 8, 8, 8
    c.eval.every_steps = c.checkpoint.every_steps = 3
    c.log_every_steps = 1
  else:
    raise ValueError(
      f"unknown gsm_infinite config variant {variant!r}; use cpu, tiny, jet_nemotron_2b, "
      "ouro_1_4b, ouro_1_4b_warmup, ouro_1_4b_sliding or tiny_pretrained"
    )
  return c
