"""Making sure a TFDS data set is on disk in a format grain can read.

`prepare_dataset` never downloads: it builds the offline data sets of this
package (`digits`) on first use and, for any other data set, raises an error
that names the command which prepares it. Reading needs random access, so the
data must be array_record (or parquet); a tfrecord-only copy is an error too.

That command is this module, run on a host with network:

  python -m diffusion_jax.datasets.prepare cifar10 --data_dir=DIR

It calls `download_and_prepare(file_format="array_record")`. (The `tfds` CLI
of tfds 4.9.10 does the same with `tfds build NAME --file_format=array_record`
but fails to start without apache-beam installed.)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import tempfile
import time

from absl import logging
import ml_collections
import tensorflow_datasets as tfds

from diffusion_jax import datasets as offline_datasets

_RANDOM_ACCESS_FORMATS = frozenset({"array_record", "parquet"})


def prepare_dataset(data_config: ml_collections.ConfigDict
                    ) -> tfds.core.DatasetBuilder:
  """Makes sure `data_config.name` is prepared in a random-access format.

  Builders in `diffusion_jax.datasets.OFFLINE_BUILDERS` (`digits`) are built
  on first use, as array_record, with no network. Any other data set must be
  prepared already: this never downloads, so it can neither hang on a host
  without network nor start a large download by accident.

  Args:
    data_config: the `config.data` section (`name`, `data_dir`,
      `train_split`).

  Returns:
    A builder whose `as_data_source` reads the data.

  Raises:
    FileNotFoundError: the data set is not prepared; the message holds the
      command that prepares it.
    ValueError: the name is unknown, or the data set is prepared only in a
      format without random access (tfrecord).
  """
  builder = _builder(data_config)
  if builder.is_prepared():
    _check_random_access(builder)
    return builder
  if builder.name in offline_datasets.OFFLINE_BUILDERS:
    return _build_offline(data_config)
  if _opens_without_files(builder, data_config.train_split):
    # Only `tfds.testing.mock_data` serves data with nothing on disk.
    return builder
  raise FileNotFoundError(_missing_message(builder, data_config))


def _builder(data_config: ml_collections.ConfigDict
             ) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown data set {data_config.name!r}: not a TFDS name, nor one of "
        f"the offline builders {sorted(offline_datasets.OFFLINE_BUILDERS)}."
    ) from e


def _check_random_access(builder: tfds.core.DatasetBuilder) -> None:
  formats = {f.value for f in builder.info.available_file_formats()}
  if not formats & _RANDOM_ACCESS_FORMATS:
    raise ValueError(
        f"Data set {builder.name!r} is prepared at {builder.data_dir} only as "
        f"{sorted(formats)}, which grain cannot read (it needs random "
        "access). Prepare it into another data dir with:\n  python -m "
        f"diffusion_jax.datasets.prepare {builder.name} --data_dir=NEW_DIR\n"
        "or add array_record files beside it (needs apache-beam) with:\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record")


def _build_offline(data_config: ml_collections.ConfigDict
                   ) -> tfds.core.DatasetBuilder:
  """Builds an offline data set once, even if several local processes ask."""
  path = _builder(data_config).data_dir
  # Processes of one host (e.g. a multi-process test) may start together:
  # one builds while the others wait, then they all read. The lock lives in
  # the temp dir so the data dir holds only TFDS's files.
  digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
  lock_path = os.path.join(tempfile.gettempdir(),
                           f"diffusion_jax_{digest}.lock")
  with open(lock_path, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = _builder(data_config)
      if not builder.is_prepared():
        start = time.perf_counter()
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
        logging.info("Built %s in %s (%.1f s).", builder.name, path,
                     time.perf_counter() - start)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  # A fresh builder reads the split sizes that were just written.
  return _builder(data_config)


def _opens_without_files(builder: tfds.core.DatasetBuilder, split: str) -> bool:
  try:
    builder.as_data_source(split=split)
  except Exception:  # pylint: disable=broad-except
    # Any failure means "not readable": the caller raises the clear error.
    return False
  return True


def _missing_message(builder: tfds.core.DatasetBuilder,
                     data_config: ml_collections.ConfigDict) -> str:
  data_dir = data_config.data_dir or tfds.core.constants.get_default_data_dir()
  manual = ""
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    manual = " --manual_dir=DIR_WITH_THE_DOWNLOADED_FILES"
  return (
      f"Data set {data_config.name!r} is not prepared in {data_dir} (looked "
      f"for {builder.data_dir}). The input pipeline never downloads. Prepare "
      "it once, on a host with network, with:\n  python -m "
      f"diffusion_jax.datasets.prepare {data_config.name} "
      f"--data_dir={data_dir}{manual}\nor, with apache-beam installed (the "
      f"tfds 4.9.10 CLI needs it):\n  tfds build {data_config.name} "
      f"--file_format=array_record --data_dir={data_dir}{manual}\n"
      "then copy that data dir to hosts without network.")


def main(argv: list[str] | None = None) -> None:
  """Downloads (if needed) and prepares a data set as array_record."""
  parser = argparse.ArgumentParser(
      description="Prepare a TFDS data set as array_record for diffusion_jax "
      "(downloads it: run on a host with network).")
  parser.add_argument("name", help="TFDS name, e.g. cifar10 or lsun/bedroom.")
  parser.add_argument("--data_dir", default="",
                      help="TFDS data dir (default ~/tensorflow_datasets).")
  parser.add_argument("--manual_dir", default=None,
                      help="Folder of manually downloaded files, if needed.")
  args = parser.parse_args(argv)
  builder = tfds.builder(args.name, data_dir=args.data_dir or None)
  if builder.is_prepared():
    # Preparing again would be a no-op, even in another format.
    _check_random_access(builder)
  else:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=args.manual_dir, try_download_gcs=False))
  print(f"{builder.info.full_name} is ready at {builder.data_dir}")


if __name__ == "__main__":
  main()
