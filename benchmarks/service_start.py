"""How fast the service starts answering: its __init__ against the load of the model it starts in the background.

The service is built in process from settings (`build_service`, as `bentoml serve` builds it) for a random
checkpoint imported into a temporary store. `__init__` must return at once (the orchestrator's liveness probe
answers meanwhile, and readiness follows the load), whatever the load takes; the run reads the weights
`--hold` seconds late, as a slow disk or a 14 GB checkpoint would, and reports __init__'s seconds, the load's,
and their ratio (the goal: __init__ under 5 s and a small fraction of the load).

    .venv/bin/python benchmarks/service_start.py [--preset tiny] [--hold 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(tag: str, home: Path, hold: float) -> dict[str, float]:
    """One start: (__init__'s seconds, the seconds until ready) with the weights' read `hold` seconds late."""
    import bentoml
    import transformers
    from bentoml._internal.models.model import ModelStore

    from falcon_service.config import Settings
    from falcon_service.service import build_service

    real_load, real_get = transformers.AutoModelForCausalLM.from_pretrained, bentoml.models.get

    def late_load(*args, **kwargs):
        threading.Event().wait(hold)
        return real_load(*args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = late_load
    bentoml.models.get = lambda name: real_get(name, _model_store=ModelStore(home / "models"))
    try:
        service = build_service(Settings(model=tag))
        started = time.perf_counter()
        instance = service.inner()
        init = time.perf_counter() - started
        while not instance.__is_ready__():
            if instance.load_error is not None:
                raise instance.load_error
            time.sleep(0.01)
        ready = time.perf_counter() - started
        instance.engine.shutdown()
    finally:
        transformers.AutoModelForCausalLM.from_pretrained, bentoml.models.get = real_load, real_get
    return {"init_seconds": round(init, 4), "ready_seconds": round(ready, 3), "init_share": round(init / ready, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="random checkpoint preset (tiny, small, 7b)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the weights' read is held back")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from import_model import import_random

    with tempfile.TemporaryDirectory(prefix="service-start-") as tmp:
        home = Path(tmp)
        tag = str(import_random(args.preset, bentoml_home=home))
        runs = [measure(tag, home, args.hold) for _ in range(args.repeats)]
    summary = {key: round(statistics.median(run[key] for run in runs), 4) for key in runs[0]}
    print(json.dumps({"preset": args.preset, "hold_seconds": args.hold, "runs": runs, "median": summary,
                      "init_under_5_s": summary["init_seconds"] < 5}, indent=2))


if __name__ == "__main__":
    main()
