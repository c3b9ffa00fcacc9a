r"""Converts pytorch-fid's Inception weights (.pth) to the .npz that inception.py reads.

  # once, on any machine with torch (pip install torch):
  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m diffusion_jax.evaluation.convert_inception_weights \
      pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The .npz keeps the state dict's names and PyTorch layouts (472 arrays, 23.9M
values, about 96 MB); BatchNorm's `num_batches_tracked` counters are dropped.
Every name and shape is checked before anything is written. Only this script
needs torch; evaluation reads the .npz with numpy.
"""
from __future__ import annotations

import argparse

import numpy as np

from diffusion_jax.evaluation import inception


def convert(pth_path: str, npz_path: str) -> int:
  """Writes `npz_path` from `pth_path`; returns the number of arrays written."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only this tool needs it)
  except ImportError as e:
    raise SystemExit("Converting a .pth needs torch (pip install torch); run this on "
                     "any machine that has it and copy the .npz.") from e
  state = torch.load(pth_path, map_location="cpu", weights_only=True)
  arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()
            if not k.endswith("num_batches_tracked")}
  inception.check_layout(arrays, repr(pth_path))
  np.savez(npz_path, **arrays)
  return len(arrays)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("npz", help="output .npz")
  args = parser.parse_args(argv)
  n = convert(args.pth, args.npz)
  print(f"Wrote {n} arrays to {args.npz}")


if __name__ == "__main__":
  main()
