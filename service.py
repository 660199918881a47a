"""`bentoml serve` target: re-exports the service class."""

from falcon_service.service import FalconService

__all__ = ["FalconService"]
