"""TFDS builders for data sets that this package builds itself, offline.

Importing this package registers every builder below with TFDS, so that
`tfds.builder("digits", data_dir=...)` (or "shapes") and `tfds build digits --imports
diffusion_jax.datasets` find it.
"""
from diffusion_jax.datasets.digits import Digits
from diffusion_jax.datasets.shapes import Shapes

# Data sets that `input_pipeline.prepare_dataset` may build on first use: they
# need no network and take seconds. Any other data set must be prepared
# explicitly (see the error message there).
OFFLINE_BUILDERS: dict[str, type] = {"digits": Digits, "shapes": Shapes}

__all__ = ["Digits", "OFFLINE_BUILDERS", "Shapes"]
