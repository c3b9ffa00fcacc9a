"""Metric writers, image grids and the progress line."""
import glob
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import run_logging


def read_events(logdir):
  """Decodes every Event in the TFRecord event files under `logdir`."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + length]  # skip the length's crc
      pos += 12 + length + 4  # and the payload's crc
      events.append(event_pb2.Event.FromString(payload))
  return events


# ------------------------------------------------------------- MetricWriter


def test_jsonl_written_and_read_back(tmp_path):
  w = run_logging.MetricWriter(tmp_path, enabled=True)
  w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3)})
  # Flushed per call: readable before flush/close.
  assert run_logging.read_metrics(tmp_path) == [
      {"step": 1, "loss": 0.5, "lr": pytest.approx(1e-3)}]
  w.write_scalars(np.int64(2), {"loss": float("nan")})
  w.close()
  w.close()  # idempotent
  recs = run_logging.read_metrics(tmp_path)
  assert [r["step"] for r in recs] == [1, 2]
  assert np.isnan(recs[1]["loss"])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "loss": 0.5,
                                  "lr": pytest.approx(1e-3)}


def test_step_key_is_reserved(tmp_path):
  with run_logging.MetricWriter(tmp_path, enabled=True) as w:
    with pytest.raises(ValueError, match="step"):
      w.write_scalars(1, {"step": 3.0})


def test_read_metrics_missing_file(tmp_path):
  assert run_logging.read_metrics(tmp_path) == []


def test_truncated_last_line_ignored_and_restart_appends(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
  assert run_logging.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
  # A restarted writer must not glue its first record onto the broken line.
  with run_logging.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(2, {"loss": 0.25})
  assert run_logging.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5},
                                            {"step": 2, "loss": 0.25}]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = run_logging.MetricWriter(workdir, enabled=False)
  assert not w.enabled
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, "samples", np.zeros((4, 4, 3), np.uint8))
  w.flush()
  w.close()
  assert not workdir.exists()
  assert os.listdir(tmp_path) == []


def test_tensorboard_event_file(tmp_path):
  w = run_logging.MetricWriter(tmp_path, enabled=True)
  w.write_scalars(7, {"loss": 0.125})
  grid = run_logging.make_grid(np.full((4, 3, 3, 1), 200, np.uint8))
  w.write_images(7, "samples", grid)
  w.flush()
  logdir = tmp_path / "tensorboard"
  files = glob.glob(str(logdir / "events.out.tfevents.*"))
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  values = {(e.step, v.tag): v for e in read_events(logdir)
            for v in e.summary.value}
  assert values[(7, "loss")].simple_value == 0.125
  img = values[(7, "samples")].image
  assert (img.height, img.width) == grid.shape[:2]
  w.close()


def test_write_images_rejects_float(tmp_path):
  with run_logging.MetricWriter(tmp_path, enabled=True) as w:
    with pytest.raises(ValueError, match="uint8"):
      w.write_images(0, "x", np.zeros((4, 4, 3), np.float32))


# ------------------------------------------------------------------ images


def test_to_uint8_endpoints_and_rounding():
  x = np.array([-1.0, 1.0, 0.0, -2.0, 3.0, np.nan, -1 + 1 / 127.5,
                -1 + 0.4 / 127.5, -1 + 0.6 / 127.5], np.float32)
  np.testing.assert_array_equal(run_logging.to_uint8(x),
                                [0, 255, 128, 0, 255, 0, 1, 0, 1])
  out = run_logging.to_uint8(np.zeros((2, 3, 3, 1), np.float32))
  assert out.dtype == np.uint8 and out.shape == (2, 3, 3, 1)


def test_to_uint8_accepts_jax_arrays():
  import jax.numpy as jnp
  np.testing.assert_array_equal(run_logging.to_uint8(jnp.array([-1.0, 1.0])),
                                [0, 255])


def test_make_grid_layout_exact():
  # Five 2x3 RGB tiles, each filled with its index + 1; default nrow = 3.
  imgs = np.stack([np.full((2, 3, 3), i + 1, np.uint8) for i in range(5)])
  g = run_logging.make_grid(imgs, padding=1, pad_value=9)
  # 2 rows, 3 columns: H = 2*(2+1)+1 = 7, W = 3*(3+1)+1 = 13.
  assert g.shape == (7, 13, 3) and g.dtype == np.uint8
  expect = np.full((7, 13), 9, np.uint8)
  for i in range(5):
    r, c = divmod(i, 3)
    expect[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c] = i + 1
  for ch in range(3):
    np.testing.assert_array_equal(g[..., ch], expect)
  # Borders, separators and the empty sixth slot are pad_value.
  assert (g[0] == 9).all() and (g[:, 0] == 9).all() and (g[3] == 9).all()
  assert (g[4:6, 9:12] == 9).all()


def test_make_grid_row_major_positions_and_options():
  imgs = np.arange(4 * 1 * 1 * 1, dtype=np.uint8).reshape(4, 1, 1, 1) + 10
  g = run_logging.make_grid(imgs, nrow=4, padding=0)
  np.testing.assert_array_equal(g[..., 0], [[10, 11, 12, 13]])
  g = run_logging.make_grid(imgs, nrow=1, padding=0)
  np.testing.assert_array_equal(g[..., 0], [[10], [11], [12], [13]])
  g = run_logging.make_grid(imgs, padding=2)  # 2x2, grayscale stays 1 channel
  assert g.shape == (1 * 2 + 6, 1 * 2 + 6, 1)
  assert g[2, 2, 0] == 10 and g[2, 5, 0] == 11 and g[5, 2, 0] == 12
  assert g[5, 5, 0] == 13 and g.sum() == 10 + 11 + 12 + 13
  assert run_logging.make_grid(imgs, nrow=100, padding=0).shape == (1, 4, 1)
  with pytest.raises(ValueError, match="uint8"):
    run_logging.make_grid(imgs.astype(np.float32))
  with pytest.raises(ValueError):
    run_logging.make_grid(imgs[:, :, :, 0])


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_round_trip(tmp_path, channels, mode):
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (6, 16, 16, channels), dtype=np.uint8)
  path = tmp_path / "sub" / "grid.png"
  grid = run_logging.save_image_grid(path, imgs, nrow=3, upscale=4)
  # 2 rows x 3 cols of 16x16 plus 1-pixel padding, all times 4.
  assert grid.shape == (4 * 35, 4 * 52, channels)
  with Image.open(path) as im:
    assert im.mode == mode and im.size == (4 * 52, 4 * 35)
    back = np.asarray(im)
  np.testing.assert_array_equal(back.reshape(grid.shape), grid)
  # Nearest upscaling: tile 0's top-left pixel becomes a 4x4 block.
  assert (back.reshape(grid.shape)[4:8, 4:8] == imgs[0, 0, 0]).all()
  assert [p for p in os.listdir(path.parent) if p != "grid.png"] == []


def test_save_png_replaces_atomically(tmp_path):
  path = tmp_path / "a.png"
  run_logging.save_png(path, np.zeros((2, 2, 3), np.uint8))
  run_logging.save_png(path, np.full((3, 5, 4), 7, np.uint8))
  with Image.open(path) as im:
    assert im.mode == "RGBA" and im.size == (5, 3)
  with pytest.raises(ValueError):
    run_logging.save_png(path, np.zeros((2, 2, 2), np.uint8))
  assert os.listdir(tmp_path) == ["a.png"]


# ---------------------------------------------------------------- Progress


class FakeClock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_progress_rate_eta_and_throttle():
  clock = FakeClock()
  p = run_logging.Progress(4000, start_step=1000, batch_size=64,
                       every_seconds=10.0, clock=clock)
  clock.t += 5.0
  assert p.update(1050) is None  # throttled
  clock.t += 15.0  # 20 s since start, 218 steps -> 10.9 steps/s
  line = p.update(1218, {"loss": 0.041, "grad_norm": 1.23456})
  assert line == ("step 1218/4000 (30.4%) 10.9 steps/s 698 img/s ETA 4m15s "
                  "loss 0.041 grad_norm 1.235")
  # The rate is measured since the last report, not since the start.
  clock.t += 1.0
  assert p.update(1300) is None
  line = p.update(1300, force=True)  # 82 steps in 1 s
  assert line.startswith("step 1300/4000 (32.5%) 82.0 steps/s 5248 img/s "
                         "ETA 33s")
  clock.t += 2.0
  assert p.update(4000) == (  # the last step always reports
      "step 4000/4000 (100.0%) 1350 steps/s 86400 img/s ETA 0s")


def test_progress_without_batch_size_and_slow_rates():
  clock = FakeClock()
  p = run_logging.Progress(100, batch_size=None, every_seconds=1.0, clock=clock)
  clock.t += 40.0
  assert p.update(1) == "step 1/100 (1.0%) 0.025 steps/s ETA 1h06m00s"
  clock.t += 5.0
  assert p.update(1) == "step 1/100 (1.0%) ? steps/s ETA ?"  # no progress


def test_format_duration():
  assert run_logging.format_duration(17.4) == "17s"
  assert run_logging.format_duration(257) == "4m17s"
  assert run_logging.format_duration(7389) == "2h03m09s"
