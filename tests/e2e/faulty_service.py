"""The service with faults injected into its engine on demand, for the liveness tests
(`bentoml serve tests.e2e.faulty_service:FalconService`; the faults: faults.py)."""

from __future__ import annotations

from service import FalconService
from tests.e2e import faults  # noqa: F401  (patches the engine's forward pass)

__all__ = ["FalconService"]
