"""The service with faults injected into its engine on demand, for the liveness tests
(`bentoml serve tests.e2e.faulty_service:FalconService`): while the file FALCON_TEST_FAULT_FILE names a
fault, every forward pass of the engine fails ("fail", as on a broken GPU) or does not return ("hang", as
a hung kernel)."""

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


falcon.FalconRunner.forward = _forward

from service import FalconService  # noqa: E402  (the service, after the patch)

__all__ = ["FalconService"]
