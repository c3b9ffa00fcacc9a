"""The project's default XLA flags: added where unset, the user's kept, and in effect."""
import os

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import xla_flags

_YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_adds_defaults_after_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  added = xla_flags.apply_defaults(env)
  assert [f.split("=")[0] for f in added] == [_YNN]
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4"] + added
  assert xla_flags.apply_defaults(env) == []  # a second call adds nothing


def test_keeps_the_users_choice():
  env = {"XLA_FLAGS": f"{_YNN}=dot"}
  assert xla_flags.apply_defaults(env) == []
  assert env["XLA_FLAGS"] == f"{_YNN}=dot"


def test_unmeasured_jax_version_gets_no_flags(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.11.0")
  env = {}
  assert xla_flags.apply_defaults(env) == []
  assert not env


def test_warns_instead_of_setting_once_the_backend_runs(monkeypatch):
  jax.devices()  # make sure the backend is up
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert xla_flags.apply_defaults() == []
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU flag")
def test_conftest_defaults_are_in_effect():
  """The tests' process compiles convolutions without YNNPACK fusions."""
  x, w = jnp.ones((8, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hlo = jax.jit(conv).lower(x, w).compile().as_text()
  assert "convolution(" in hlo
  assert "ynn" not in hlo
  # The check can fail: with YNNPACK's convolution fusion named, it is used.
  with_ynn = jax.jit(conv).lower(x, w).compile(
      compiler_options={_YNN[2:]: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}).as_text()
  assert "ynn" in with_ynn
