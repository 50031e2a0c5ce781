"""gs:// run directories on an in-memory GCS (tests/fake_gcs.py): every file a run writes or
reads goes through sleep_jax.paths, and nothing lands in a local folder named `gs:`."""

import json
import os
import struct

import pytest
from fake_gcs import installed

from sleep_jax import paths, rundir


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local write of "gs://b/x" would create ./gs:/b/x here
  with installed() as fake:
    yield fake
  assert not os.path.exists(tmp_path / "gs:"), os.listdir(tmp_path)


def read_events(data: bytes):
  """The Event protos of a TensorBoard event file (records: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[offset + 12 : offset + 12 + length])
    yield event
    offset += 12 + length + 4


def results(step, num_steps=4):
  return rundir.Results(
    task="rule110",
    task_settings={"depth": 1},
    passes=2,
    window=24,
    eviction="hard",
    pattern="AGAG",
    seed=0,
    step=step,
    num_steps=num_steps,
    tokens_seen=step * 1600,
    wall_s=1.0,
    eval={"loss": 0.5, "exact_accuracy": 0.25},
  )


def test_path_helpers_keep_remote_paths_remote(gcs):
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("run") == os.path.join(os.getcwd(), "run")
  assert paths.join("gs://b/sweep", "n1", "seed0") == "gs://b/sweep/n1/seed0"
  assert paths.relative("gs://b/sweep/n1/seed0", "gs://b/sweep") == "n1/seed0"
  with pytest.raises(ValueError, match="not both local or both remote"):
    paths.relative("gs://b/sweep/n1", "runs/sweep")
  paths.write_text("gs://b/d/a.txt", "one\n")
  paths.append_text("gs://b/d/a.txt", "two\n")
  paths.write_bytes("gs://b/d/e/c.bin", b"\x00\x01")
  assert paths.read_text("gs://b/d/a.txt") == "one\ntwo\n"
  assert paths.exists("gs://b/d/e/c.bin") and not paths.exists("gs://b/d/missing")
  assert list(paths.walk("gs://b/d")) == [
    ("gs://b/d", ["e"], ["a.txt"]),
    ("gs://b/d/e", [], ["c.bin"]),
  ]
  with pytest.raises(FileNotFoundError):
    paths.read_text("gs://b/d/missing")
  assert set(gcs.files()) == {"gs://b/d/a.txt", "gs://b/d/e/c.bin"}


def test_an_interrupted_remote_write_leaves_the_old_object(gcs):
  rundir.write_json("gs://b/x.json", {"a": 1})
  with pytest.raises(KeyboardInterrupt), paths.open_atomic("gs://b/x.json") as f:
    f.write('{"a": ')
    raise KeyboardInterrupt  # killed half-way through writing the new version
  assert rundir.read_json("gs://b/x.json") == {"a": 1}


def test_a_run_directory_in_cloud_storage(gcs):
  run = rundir.RunDir("gs://bucket/sweep/run")
  run.ensure_writable()
  run.write_config({"seed": 0, "task": {"name": "rule110"}})
  for step in (1, 2, 2):
    rundir.append_jsonl(run.file(rundir.TRAIN_LOG_FILE), {"step": step, "loss": 3.0 - step})
  run.write_results(results(4))
  assert run.checkpoints == "gs://bucket/sweep/run/checkpoints"  # orbax gets the gs:// path
  assert run.config() == {"seed": 0, "task": {"name": "rule110"}}
  assert [r["step"] for r in run.train_log()] == [1, 2] and run.is_finished(4)
  assert set(gcs.files()) == {
    f"gs://bucket/sweep/run/{name}"
    for name in (rundir.CONFIG_FILE, rundir.TRAIN_LOG_FILE, rundir.RESULTS_FILE)
  }
  with pytest.raises(rundir.WorkdirError, match="incompatible config"):
    run.check_compatible_config({"seed": 1, "task": {"name": "rule110"}})


def test_a_cloud_workdir_without_gcsfs_is_a_clear_error(monkeypatch, tmp_path):
  import fsspec

  def missing(protocol):
    raise ImportError("Install gcsfs to access Google Storage")

  monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(rundir.WorkdirError, match="pip install gcsfs"):
    rundir.RunDir("gs://bucket/run").ensure_writable()
  assert os.listdir(tmp_path) == []


def test_tensorboard_events_are_staged_locally_and_copied_to_the_bucket(gcs):
  from sleep_jax.train.writer import MetricsWriter

  run = rundir.RunDir("gs://bucket/run")
  writer = MetricsWriter(run, is_writer=True)
  staging = writer._staged.local
  assert not paths.is_remote(staging)
  writer.eval(2, {"loss": 0.5, "exact_accuracy": 0.25})  # an evaluation copies the events
  first = [name for name in gcs.files() if "events.out.tfevents" in name]
  assert len(first) == 1
  writer.train(
    3,
    4,
    {"loss": 0.4, "accuracy": 0.6, "exact_accuracy": 0.3},
    learning_rates={},
    tokens_per_s=1.0,
    eta_s=1.0,
  )
  writer.eval(4, {"loss": 0.25, "exact_accuracy": 0.5})
  writer.close()  # the last copy, and the staging directory goes
  assert not os.path.exists(staging)
  scalars = {}
  for name, data in gcs.files().items():
    if "events.out.tfevents" in name:
      for event in read_events(data):
        for value in event.summary.value:
          scalars.setdefault(value.tag, []).append(event.step)
  # Every scalar reached the bucket, across the event files (one per copy).
  assert sorted(scalars["eval/loss"]) == [2, 4] and scalars["train/loss"] == [3]
  lines = rundir.read_jsonl(run.file(rundir.EVAL_LOG_FILE))
  assert [line["step"] for line in lines] == [2, 4]


def test_a_local_workdir_writes_events_in_place(tmp_path):
  from sleep_jax.train.writer import MetricsWriter

  writer = MetricsWriter(rundir.RunDir(str(tmp_path)), is_writer=True)
  writer.eval(2, {"loss": 0.5})
  writer.close()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_init_from_and_generate_read_their_directories_from_cloud_storage(gcs):
  from configs import rule110 as rule110_configs
  from sleep_jax.model.config import ModelConfig
  from sleep_jax.train import checkpoint
  from sleep_jax.train.config import ExperimentConfig

  model = ModelConfig(vocab_size=6, d_model=32, num_heads=2, head_dim=16, mlp_dim=64)
  other = json.loads(json.dumps(model.__dict__))
  other["d_model"] = 64
  paths.write_text(f"gs://bucket/init/{checkpoint.INITIAL_MODEL_FILE}", json.dumps(other))
  # model.json is read from the bucket (the parameters would be orbax's, next to it)
  with pytest.raises(ValueError, match="holds another model.*d_model: saved 64 vs config 32"):
    checkpoint.load_initial("gs://bucket/init", model, target=None)
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    checkpoint.load_initial("gs://bucket/nothing", model, target=None)
  # generate: the run's config.json comes from the bucket, its checkpoints are looked up there
  with pytest.raises(rundir.WorkdirError, match="holds no run"):
    checkpoint.restore_model("gs://bucket/empty")
  config = ExperimentConfig.from_config(rule110_configs.get_config("tiny"))
  rundir.RunDir("gs://bucket/run").write_config(config.to_dict())
  with pytest.raises(rundir.WorkdirError, match="gs://bucket/run has no checkpoint yet"):
    checkpoint.restore_model("gs://bucket/run")


def test_a_tokenizer_json_in_cloud_storage(gcs, tmp_path):
  from sleep_jax.data import gsm_task
  from sleep_jax.data.config import GsmInfiniteTaskConfig

  local = gsm_task.tokenizer_path("word_level")
  paths.copy_file(local, "gs://bucket/tok/tokenizer.json")
  tokenizer = gsm_task.load_tokenizer("gs://bucket/tok/tokenizer.json")
  assert tokenizer.get_vocab() == gsm_task.load_tokenizer(local).get_vocab()
  with pytest.raises(ValueError, match="is not a file"):
    GsmInfiniteTaskConfig(tokenizer="gs://bucket/tok/missing.json")
