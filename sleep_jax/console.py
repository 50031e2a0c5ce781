"""What a run prints: the project's own lines only, unless more is asked for.

Every module of the project logs through `logging.getLogger(__name__)` (loggers under
"sleep_jax"). `configure` gives those loggers one plain stderr handler and turns third-party
INFO (orbax's checkpoint chatter, JAX's backend probing, absl) off; a `--verbosity=0` (INFO)
or higher brings it back. Processes other than 0 of a multi-process job print warnings and
errors only.
"""

from __future__ import annotations

import logging
import sys
import time

PROJECT_LOGGER = "sleep_jax"


class _ProjectFormatter(logging.Formatter):
  """ "12:03:04 message" for INFO, "12:03:04 WARNING message" otherwise."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno == logging.INFO else f"{record.levelname} "
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def configure(*, verbosity: int | None = None, is_writer: bool = True, stream=None) -> None:
  """Routes the project's log lines to `stream` (stderr) and quiets everyone else.

  Args:
    verbosity: absl's --verbosity when given on the command line (0 INFO, 1 DEBUG, -1 WARNING):
      third-party loggers then log at that level too. None: third-party WARNING and above only.
    is_writer: False on processes other than 0 of a multi-process job (warnings only).
    stream: where the project's lines go (default sys.stderr).
  """
  from absl import logging as absl_logging  # absl owns the root handler of absl apps

  project = logging.getLogger(PROJECT_LOGGER)
  for handler in list(project.handlers):
    project.removeHandler(handler)
  handler = logging.StreamHandler(stream or sys.stderr)
  handler.setFormatter(_ProjectFormatter())
  project.addHandler(handler)
  project.setLevel(logging.INFO if is_writer else logging.WARNING)
  project.propagate = False  # not again through absl's root handler
  if verbosity is None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  else:
    absl_logging.set_verbosity(verbosity)


def format_table(header: list[str], rows: list[list[str]]) -> str:
  """A plain-text table with aligned columns (the final summary of a run or a sweep)."""
  widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_duration(seconds: float) -> str:
  """ "1m05s", "2h03m"; "?" when not known yet (e.g. an ETA before two timed steps)."""
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
