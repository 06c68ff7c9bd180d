"""Fixtures of tests/model; they live in fmnist_support.py (a unique module name, so that test
modules can import its helpers without clashing with other conftest.py files)."""

from fmnist_support import (  # noqa: F401  (pytest registers fixtures found here)
    committed_model,
    direct_predictions,
    handler,
    model_dir,
    server,
    test_set,
)
