"""Run at the start of every Python process that has this folder on PYTHONPATH (a liveness test's server, its
workers and its engine process): where the engine can be imported, its forward pass gets the faults of faults.py,
so that they reach the engine whichever process runs it."""

import contextlib
import os
import sys

if os.environ.get("FALCON_TEST_FAULT_FILE"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with contextlib.suppress(ImportError):  # a process that cannot import the engine (`bentoml` itself) runs none
        import faults  # noqa: F401
