"""Writes `inception_fid_torch.npz`: pytorch-fid's InceptionV3 on seeded random weights.

Needs torch, torchvision, pytorch-fid and Pillow only (no JAX), so it runs in a
torch-only venv, with no download:

  python tests/data/make_inception_reference.py tests/data/inception_fid_torch.npz

The real FID weights (about 96 MB) cannot be shipped, so every weight is drawn by
`inception_random_weights.random_weights` (numpy only), which
`tests/test_inception_reference.py` runs again to rebuild the same weights for
the Flax network. The network is pytorch-fid's own: `pytorch_fid.inception.
InceptionV3([3])` (resize_input and normalize_input on, use_fid_inception=True,
what `python -m pytorch_fid` builds), with `load_state_dict_from_url` replaced by
a function that hands it the random state dict (loaded strictly, so the names
and shapes are pytorch-fid's). Images go through pytorch-fid's own data path:
PNG files read by `fid_score.get_activations` (PIL `.convert('RGB')`, `ToTensor`),
then `F.interpolate(299, bilinear, align_corners=False)` and `2x - 1` in the
wrapper.

The `.npz` holds:

* `images_rgb` uint8 [8, 32, 32, 3]: set A (`[:4]`, blocky colour images with
  little noise) and set B (`[4:]`, the same kind with strong noise);
  `images_gray` uint8 [2, 28, 28, 1] (saved as 'L' PNGs; pytorch-fid repeats
  them to RGB);
* `pool3_rgb` [8, 2048], `pool3_gray` [2, 2048]: `get_activations` (pool3);
* `logits_rgb` [8, 1008], `logits_gray` [2, 1008]: the network's `fc` on those
  pool3 features (checked here against torchvision's full `Inception3.forward`);
* `fid_ab`: `fid_score.calculate_fid_given_paths([A, B])`, pytorch-fid's FID
  between the two sets (float64; 4 images each, so rank-deficient covariances);
* `weights_sha256` (`inception_random_weights.checksum`), `seed`, `versions`.
"""
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import inception_random_weights  # noqa: E402  pylint: disable=g-import-not-at-top

SEED = inception_random_weights.SEED


def make_images(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """(rgb uint8 [8, 32, 32, 3], gray uint8 [2, 28, 28, 1]): blocky images + noise.

  Each image is a random k x k grid of colours (k in 2, 4, 8) blown up to full
  size; the first four get noise of std 10, the last four std 60.
  """
  rng = np.random.default_rng(seed + 1)

  def blocky(size, channels, noise):
    k = int(rng.choice([2, 4, 8]))
    low = rng.random((k, k, channels)) * 255
    img = np.repeat(np.repeat(low, -(-size // k), 0), -(-size // k), 1)[:size, :size]
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)

  rgb = np.stack([blocky(32, 3, 10 if i < 4 else 60) for i in range(8)])
  gray = np.stack([blocky(28, 1, 30) for _ in range(2)])
  return rgb, gray


def fid_layout() -> dict[str, tuple[int, ...]]:
  """pytorch-fid's state-dict layout, built as `fid_inception_v3` does, less the load."""
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                      ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
    setattr(net, name, block)
  return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def patch_pytorch_fid(weights: dict[str, np.ndarray]) -> list:
  """Makes pytorch-fid load `weights` instead of downloading; returns the networks built.

  Every `fid_inception_v3()` pytorch-fid calls from then on is appended to the
  returned list (the `InceptionV3` wrapper keeps its blocks but not its `fc`).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  state = {k: torch.from_numpy(v) for k, v in weights.items()}

  def load_state_dict_from_url(url, progress=True):
    del progress
    assert url == pfi.FID_WEIGHTS_URL, url
    out = dict(state)
    for key in fid_layout():  # BN counters: in the state dict, unused in eval
      out.setdefault(key, torch.zeros((), dtype=torch.long))
    return out

  built, original = [], pfi.fid_inception_v3

  def fid_inception_v3():
    built.append(original())
    return built[-1]

  pfi.load_state_dict_from_url = load_state_dict_from_url
  pfi.fid_inception_v3 = fid_inception_v3
  return built


def write_pngs(images: np.ndarray, folder: pathlib.Path) -> list[str]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True)
  paths = []
  for i, img in enumerate(images):
    paths.append(str(folder / f"{i:03d}.png"))
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(paths[-1])
  return paths


def torch_logits(net, pool3: np.ndarray, images: np.ndarray) -> np.ndarray:
  """The 1008 logits: `net.fc` on pool3, checked against `net`'s full forward."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    logits = net.fc(torch.from_numpy(pool3.astype(np.float32))).numpy()
    x = torch.from_numpy(np.repeat(images, 3 // images.shape[-1], -1)).permute(0, 3, 1, 2)
    x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    full = net(2 * x - 1).numpy()  # torchvision's Inception3.forward, eval mode
  np.testing.assert_allclose(full, logits, rtol=0, atol=1e-5 * np.abs(logits).max())
  return logits


def main(path: str) -> None:
  import PIL  # pylint: disable=g-import-not-at-top
  import pytorch_fid  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  torch.manual_seed(SEED)  # nothing here should be random; just in case
  layout = {k: s for k, s in fid_layout().items() if not k.endswith("num_batches_tracked")}
  weights = inception_random_weights.random_weights(layout, SEED)
  built = patch_pytorch_fid(weights)
  model = pfi.InceptionV3([3], resize_input=True, normalize_input=True,
                          use_fid_inception=True).eval()
  net = built[-1].eval()
  rgb, gray = make_images()
  out = dict(images_rgb=rgb, images_gray=gray, seed=np.int64(SEED),
             weights_sha256=np.asarray(inception_random_weights.checksum(weights)),
             versions=np.asarray(f"torch {torch.__version__}, torchvision "
                                 f"{torchvision.__version__}, pytorch-fid "
                                 f"{pytorch_fid.__version__}, numpy {np.__version__}, "
                                 f"Pillow {PIL.__version__}, CPU float32"))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for name, images in (("rgb", rgb), ("gray", gray)):
      files = write_pngs(images, tmp / name)
      pool3 = fid_score.get_activations(files, model, batch_size=len(files), dims=2048,
                                        device="cpu", num_workers=0)
      out[f"pool3_{name}"] = pool3.astype(np.float32)  # float32 in torch; float64 copy
      out[f"logits_{name}"] = torch_logits(net, pool3, images)
    write_pngs(rgb[:4], tmp / "a")
    write_pngs(rgb[4:], tmp / "b")
    out["fid_ab"] = np.float64(fid_score.calculate_fid_given_paths(
        [str(tmp / "a"), str(tmp / "b")], batch_size=4, device="cpu", dims=2048,
        num_workers=0))
  pool3 = out["pool3_rgb"]
  print(f"pool3: range [{pool3.min():.3g}, {pool3.max():.3g}], mean {pool3.mean():.3g}, "
        f"zero {np.mean(pool3 == 0):.1%}, std over images {pool3.std(0).mean():.3g}; "
        f"logits |max| {np.abs(out['logits_rgb']).max():.3g}; FID(A, B) {out['fid_ab']:.6g}")
  assert 0.01 < pool3.mean() < 10 and np.mean(pool3 == 0) < 0.5, "activations out of range"
  np.savez_compressed(path, **out)


if __name__ == "__main__":
  main(sys.argv[1])
