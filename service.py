"""`bentoml serve service:FalconService` and `bentoml build`: the service, built from this deployment's settings."""

import os

# Only the engine's step-loop thread runs multi-threaded torch work (it sets its own count, see
# Settings.torch_threads). OpenMP thread teams belong to the thread that starts them, and on CPU a
# team started first by any other thread makes the engine's ops about 2x slower. So every other
# thread stays single-threaded: this must run before torch is imported. (BentoML itself sets
# OMP_NUM_THREADS=1 in the worker of a GPU service, so its value says nothing about the machine.)
os.environ["OMP_NUM_THREADS"] = "1"

from falcon_service.service import build_service, settings_from_environment

FalconService = build_service(settings_from_environment())

__all__ = ["FalconService"]
