"""GSM-Infinite as a token task: question, context, answer; left-padded; loss on the answer only."""

import re

import numpy as np
import pytest

from configs import gsm_infinite as gsm_configs
from sleep_jax.data import config as task_configs
from sleep_jax.data import gsm_infinite, gsm_task, tasks
from sleep_jax.train import program as program_lib


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  return gsm_task.word_level_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def decode(path, ids):
  return gsm_task.load_tokenizer(path).decode([int(i) for i in ids], skip_special_tokens=False)


def test_an_example_is_question_context_answer_left_padded_with_loss_on_the_answer(
  tokenizer_path,
):
  settings = dict(family="realistic", ops=(1, 3), modulus=None, distractors=1)
  batch = gsm_task.generate(
    np.random.default_rng(0), 6, tokenizer_path=tokenizer_path, seq_len=320,
    problem_settings=settings,
  )  # fmt: skip
  # The same stream, as problems: what each row must hold.
  pad, end = gsm_task.special_ids(gsm_task.load_tokenizer(tokenizer_path))
  for row in range(6):
    tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
    content = np.flatnonzero(tokens != pad)
    assert content[-1] == 319 and np.all(np.diff(content) == 1)  # left-padded, ends the row
    text = decode(tokenizer_path, tokens[content])
    assert text.startswith("Question : what is the number of")  # the question comes first
    answer_positions = np.flatnonzero(mask)
    predicted = batch["targets"][row, answer_positions]
    assert predicted[-1] == end and mask[-1] == 0
    answer = decode(tokenizer_path, predicted[:-1]).replace(" ", "")
    assert text.split("Answer :")[-1].replace(" ", "").replace("</s>", "") == answer
    assert re.fullmatch(r"-?\d+", answer)
    # Loss only on the answer and the end token; one answer word per example.
    assert set(batch["answer_id"][row][mask > 0]) == {0}
    assert answer_positions[0] >= 320 - 64  # inside the last window of 64
  np.testing.assert_array_equal(
    batch["tokens"],
    gsm_task.generate(
      np.random.default_rng(0), 6, tokenizer_path=tokenizer_path, seq_len=320,
      problem_settings=settings,
    )["tokens"],
  )  # fmt: skip


def test_answers_are_the_generators_answers(tokenizer_path):
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  settings = dict(family="symbolic", ops=2, modulus=7, distractors=1)
  batch = gsm_task.generate(
    rng_a, 4, tokenizer_path=tokenizer_path, seq_len=512, problem_settings=settings
  )
  problems = gsm_infinite.generate_problems(rng_b, 4, **settings)  # all fit in 512 tokens
  for row, problem in enumerate(problems):
    positions = np.flatnonzero(batch["loss_mask"][row])[:-1]
    answer = decode(tokenizer_path, batch["targets"][row, positions]).replace(" ", "")
    assert int(answer) == problem["answer"]


def test_problems_that_cannot_fit_are_a_clear_error(tokenizer_path):
  with pytest.raises(ValueError, match="do not fit task.seq_len=16"):
    gsm_task.generate(
      np.random.default_rng(0), 2, tokenizer_path=tokenizer_path, seq_len=16,
      problem_settings=dict(family="symbolic", ops=3),
    )  # fmt: skip


def test_the_task_and_its_config_fit_the_sleep_schedule():
  config = gsm_configs.get_config("tiny")
  validated = program_lib.validate(config, num_devices=1)
  task = validated.task
  assert (task.seq_len, task.context_len) == (256, 192) == (256, config.sleep.context_len)
  assert [s.name for s in task.eval_slices] == ["ops2"]
  assert task.vocab_size <= config.model.vocab_size
  batch = tasks.heldout_set(task, seed=0, num=4)
  assert batch["tokens"].shape == (4, 256)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(seq_len=300, predict_len=64), "multiple of task.predict_len"),
    (dict(ops=(3, 1)), "task.ops must be a range"),
    (dict(tokenizer="/nonexistent/tokenizer.json"), "is not a file"),
    (dict(family="trivia"), "task.family"),
    (dict(target_length=5_000, seq_len=4_000), "leaves no room"),
  ],
)
def test_bad_task_settings_are_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    task_configs.task_config(dict(name="gsm_infinite", **overrides))
