"""Metric writers (process 0 only), image grids and a progress line.

Scalars go to two places: `workdir/metrics.jsonl` (one JSON object per line,
flushed on every call, so a killed run keeps everything it logged and scripts
can read it back with `read_metrics` without any TensorBoard dependency) and a
TensorBoard event file under `workdir/tensorboard`.

Why tensorboardX rather than clu or flax.metrics.tensorboard: those, like
`tf.summary`, need the `tensorboard` package, which TF 2.21 no longer installs,
and clu's last release (0.0.12, 2024) breaks on jax 0.10. tensorboardX is
maintained and writes standard event files with neither TensorFlow nor torch.

We use its synchronous `EventsWriter` and summary builders rather than its
`SummaryWriter`: the latter hands events to a background thread through a
queue, and its `flush()` does not drain that queue, so events logged just
before a flush (or a preemption) may not be on disk yet.

Images on disk and in TensorBoard are uint8 `[H, W, C]` grids built by
`make_grid` from uint8 `[N, H, W, C]` batches (see `to_uint8`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from typing import Any, Callable, Mapping

import numpy as np
from absl import logging
from PIL import Image
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes scalars and images; a no-op everywhere except process 0.

  Usage: `MetricWriter(workdir, enabled=jax.process_index() == 0)`. When
  disabled, no file or directory is created and every method returns at once.
  A restarted run appends to the same `metrics.jsonl`, so steps between the
  restored checkpoint and the crash appear twice (the later record is the one
  that continued).
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool):
    """Opens (appends to) the writers under `workdir` if `enabled`."""
    self._enabled = bool(enabled)
    self._jsonl = None
    self._tb = None
    if not self._enabled:
      return
    logdir = os.path.join(workdir, TENSORBOARD_DIR)
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    _end_partial_line(path)
    self._jsonl = open(path, "a", encoding="utf-8")
    # The file name holds the time in whole seconds and is opened with "wb":
    # a random suffix keeps a second writer (a quick restart) from
    # overwriting the first one's file.
    self._tb = EventsWriter(os.path.join(logdir, "events"),
                            filename_suffix=f".{uuid.uuid4().hex[:8]}")

  @property
  def enabled(self) -> bool:
    return self._enabled

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs scalars for one step.

    Args:
      step: the training step.
      scalars: name -> a number (Python, numpy or a 0-d jax array). The name
        "step" is reserved.

    Raises:
      ValueError: if `scalars` uses the key "step".
    """
    if not self._enabled:
      return
    if "step" in scalars:
      raise ValueError('"step" is reserved in write_scalars')
    step = int(step)
    values = {k: float(v) for k, v in scalars.items()}
    # NaN/inf are written as the JSON extensions NaN/Infinity, which Python's
    # json reads back: a diverged loss should still be visible.
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    self._write_summary(step, [tb_summary.scalar(k, v)
                               for k, v in values.items()])

  def write_images(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
    """Logs one image (usually a `make_grid` grid) to TensorBoard.

    Args:
      step: the training step.
      name: the TensorBoard tag.
      grid_uint8: uint8 [H, W, C], C in {1, 3, 4}.
    """
    if not self._enabled:
      return
    grid = _check_hwc_uint8(grid_uint8)
    self._write_summary(int(step),
                        [tb_summary.image(name, grid, dataformats="HWC")])

  def _write_summary(self, step: int, summaries: list[Any]) -> None:
    values = [v for summary in summaries for v in summary.value]
    event = event_pb2.Event(wall_time=time.time(), step=step)
    event.summary.value.extend(values)
    self._tb.write_event(event)

  def flush(self) -> None:
    """Pushes both files to disk (the event file is also fsync'ed)."""
    if not self._enabled:
      return
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both writers; afterwards every method is a no-op."""
    if not self._enabled:
      return
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _end_partial_line(path: str) -> None:
  # A process killed mid-write leaves a line without "\n"; end it so the next
  # record starts on its own line (read_metrics then skips the broken one).
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
      f.write(b"\n")


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl` back, in file order.

  A line that does not parse (the truncated last line of a killed process, or
  such a line ended by a later restart) is skipped with a warning.

  Returns:
    One dict per logged step, `{"step": int, name: float, ...}`; an empty list
    if the file does not exist.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("%s:%d: skipping an unreadable (truncated?) line",
                        path, lineno)
        continue
      if isinstance(record, dict) and "step" in record:
        records.append(record)
      else:
        logging.warning("%s:%d: skipping a line without a step", path, lineno)
  return records


# ----------------------------------------------------------------- images


def to_uint8(x: Any) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 the standard DDPM way.

  `round((x + 1) * 127.5)` clipped to [0, 255], so -1 -> 0, 0 -> 128, 1 -> 255.
  numpy rounds halves to even. NaN (a diverged model) becomes 0.

  Args:
    x: float array (numpy or jax) of any shape, nominally in [-1, 1].

  Returns:
    uint8 numpy array of the same shape.
  """
  y = (np.asarray(x, dtype=np.float32) + 1.0) * 127.5
  y = np.nan_to_num(y, nan=0.0, posinf=255.0, neginf=0.0)
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1,
              pad_value: int = 0) -> np.ndarray:
  """Tiles a batch of images into one image, row by row.

  Like torchvision's `make_grid`: `padding` pixels of `pad_value` surround
  every tile, the outer border included, and unused tiles of the last row are
  `pad_value` too.

  Args:
    images: uint8 [N, H, W, C], N >= 1.
    nrow: images per row (clamped to N); default ceil(sqrt(N)).
    padding: pixels between tiles and around the border, >= 0.
    pad_value: the fill value, 0..255.

  Returns:
    uint8 [rows * (H + p) + p, ncol * (W + p) + p, C] with p = padding,
    ncol = min(nrow, N) and rows = ceil(N / ncol); C is kept (1 stays 1).
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (see to_uint8), got {images.dtype}")
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("make_grid needs at least one image")
  if padding < 0 or not 0 <= pad_value <= 255:
    raise ValueError(f"bad padding={padding} or pad_value={pad_value}")
  ncol = math.isqrt(n - 1) + 1 if nrow is None else int(nrow)
  if ncol < 1:
    raise ValueError(f"nrow must be >= 1, got {nrow}")
  ncol = min(ncol, n)
  rows = math.ceil(n / ncol)
  p = padding
  grid = np.full((rows * (h + p) + p, ncol * (w + p) + p, c), pad_value,
                 dtype=np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = p + r * (h + p), p + col * (w + p)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str | os.PathLike, grid: np.ndarray) -> None:
  """Saves a uint8 [H, W, C] image as PNG, atomically.

  C = 1 is saved as mode 'L', 3 as 'RGB', 4 as 'RGBA'. The image goes to a
  temporary file in the same directory first and is then renamed over `path`
  (os.replace), so a crash never leaves a half-written PNG. Parent directories
  are created.
  """
  grid = _check_hwc_uint8(grid)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix=".png")
  try:
    with os.fdopen(fd, "wb") as f:
      img.save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_image_grid(path: str | os.PathLike, images_uint8: np.ndarray,
                    nrow: int | None = None, upscale: int = 1) -> np.ndarray:
  """Tiles a batch with `make_grid`, upscales it and saves it as PNG.

  Args:
    path: the .png file to write.
    images_uint8: uint8 [N, H, W, C].
    nrow: images per row (see `make_grid`).
    upscale: integer nearest-neighbour factor applied to the whole grid
      (padding included), so tiny 16x16 samples are viewable.

  Returns:
    The grid written, uint8 [upscale * H', upscale * W', C] (H', W' from
    `make_grid`), e.g. to pass on to `MetricWriter.write_images`.
  """
  if int(upscale) < 1:
    raise ValueError(f"upscale must be >= 1, got {upscale}")
  grid = make_grid(images_uint8, nrow=nrow)
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  save_png(path, grid)
  return grid


def _check_hwc_uint8(grid: np.ndarray) -> np.ndarray:
  grid = np.asarray(grid)
  if grid.ndim != 3 or grid.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected [H, W, C] with C in 1/3/4, got {grid.shape}")
  if grid.dtype != np.uint8:
    raise ValueError(f"expected uint8, got {grid.dtype}")
  return grid


# ---------------------------------------------------------------- progress


class Progress:
  """Builds a throttled progress line; the caller logs it.

  Example line:
    `step 1200/4000 (30.0%) 10.9 steps/s 697 img/s ETA 4m17s loss 0.041`

  The rate is measured over the wall time since the last report (the first
  report measures from construction, so it includes compilation time).
  """

  def __init__(self, total_steps: int, start_step: int = 0, *,
               batch_size: int | None = None, every_seconds: float = 30.0,
               clock: Callable[[], float] = time.perf_counter):
    """Starts the clock.

    Args:
      total_steps: the step at which training ends.
      start_step: the step training starts (or resumes) from.
      batch_size: global images per step; None leaves img/s out.
      every_seconds: least time between two unforced reports.
      clock: returns seconds; injectable for tests.
    """
    self.total_steps = int(total_steps)
    self.batch_size = batch_size
    self.every_seconds = float(every_seconds)
    self._clock = clock
    self._last_step = int(start_step)
    self._last_time = clock()

  def update(self, step: int, extra: Mapping[str, Any] | None = None,
             force: bool = False) -> str | None:
    """Returns a progress line if one is due, else None.

    A line is due when `force` is set, when `step` has reached `total_steps`,
    or when `every_seconds` have passed since the last line.

    Args:
      step: the number of steps done.
      extra: name -> value appended as "name value" (floats as 4 significant
        digits), e.g. {"loss": 0.041}.
      force: report now regardless of the time.
    """
    step = int(step)
    now = self._clock()
    elapsed = now - self._last_time
    if not (force or step >= self.total_steps
            or elapsed >= self.every_seconds):
      return None
    done = step - self._last_step
    rate = done / elapsed if elapsed > 0 and done > 0 else None
    self._last_step, self._last_time = step, now

    pct = 100.0 * step / self.total_steps if self.total_steps > 0 else 100.0
    parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
    parts.append(f"{_fmt_rate(rate)} steps/s")
    if self.batch_size:
      img_rate = None if rate is None else rate * self.batch_size
      parts.append(f"{_fmt_rate(img_rate)} img/s")
    remaining = max(self.total_steps - step, 0)
    if remaining == 0:
      eta = "0s"
    else:
      eta = "?" if rate is None else format_duration(remaining / rate)
    parts.append(f"ETA {eta}")
    for name, value in (extra or {}).items():
      parts.append(f"{name} {_fmt_value(value)}")
    return " ".join(parts)


def format_duration(seconds: float) -> str:
  """Formats seconds as '17s', '4m17s' or '2h03m09s' (rounded to seconds)."""
  s = int(round(max(seconds, 0.0)))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


def _fmt_rate(rate: float | None) -> str:
  if rate is None:
    return "?"
  if rate >= 100:
    return f"{rate:.0f}"
  if rate >= 1:
    return f"{rate:.1f}"
  return f"{rate:.2g}"


def _fmt_value(value: Any) -> str:
  if isinstance(value, (bool, np.bool_, str)):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)
