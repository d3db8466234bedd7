import os
import sys

# `configs/` lives at the repository root, beside the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The commands' persistent compilation cache stays out of the suite (and out
# of the home directory) unless a test turns it on (test_compile_cache.py).
os.environ.setdefault("FEDSEL_JAX_COMPILATION_CACHE", "none")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)   # JAX's own, read when jax is imported

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS directory with sklearn digits prepared, one per test module."""
  from fedsel_jax import datasets
  from tests.helpers import smoke_config
  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.load_dataset(smoke_config(path).data)
  return path
