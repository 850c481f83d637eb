"""Test setup: TensorFlow backend, quiet logs, and a fixed seed per test."""
import os
import sys

# The repo root, so tests can import `configs` (and `moco_tf`) however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # build_model sets the global dtype policy from config.precision; start every test at float32.
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
