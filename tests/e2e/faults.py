"""Faults injected into the engine's forward pass on demand (the liveness tests): while the file
FALCON_TEST_FAULT_FILE names a fault, every forward pass fails ("fail", as on a broken GPU) or does not return
("hang", as a hung kernel). Imported by `faulty_service.py` (the engine in the server's process) and by
`fault_site/sitecustomize.py` (in every process, the engine's own with FALCON_ENGINE_PROCESS)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from falcon_service.engine import falcon

FAULT_FILE = Path(os.environ["FALCON_TEST_FAULT_FILE"])
_real_forward = falcon.FalconRunner.forward


def _forward(self, batch):
    fault = FAULT_FILE.read_text().strip() if FAULT_FILE.exists() else ""
    if fault == "fail":
        raise RuntimeError("injected fault: the device failed")
    if fault == "hang":
        while FAULT_FILE.exists():
            time.sleep(0.1)
    return _real_forward(self, batch)


if falcon.FalconRunner.forward.__name__ != "_forward":  # once, though imported as `faults` and `tests.e2e.faults`
    falcon.FalconRunner.forward = _forward
