"""Sample-quality evaluation: FID, Inception Score, precision/recall, digits quality.

  stats.py             feature statistics, Frechet distance (float64, host),
                       Inception Score, reference-statistics files (.npz)
  precision_recall.py  improved precision and recall (Kynkaanniemi et al. 2019)
  inception.py         the FID InceptionV3 (pytorch-fid's port of the 2015-12-05
                       TF graph) in Flax, and its weights loader
  convert_inception_weights.py  pytorch-fid's .pth -> the .npz inception.py reads
  reference.py         real-data feature statistics from a TFDS split
  npz_io.py            the `arr_0` uint8 NHWC sample files of common FID suites
  digits_classifier.py a small classifier on the offline digits (a CPU feature net)
  digits_quality.py    the offline quality measure built on it

Modules are imported on use (`from diffusion_jax.evaluation import stats`), so
reading an .npz does not build a network.
"""
