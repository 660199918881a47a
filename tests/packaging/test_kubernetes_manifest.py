"""The Kubernetes manifest asks for one GPU and probes endpoints the service really has."""

from __future__ import annotations

from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "falcon-service.yaml"


def test_deployment_requests_one_gpu_and_probes_bentoml_health_endpoints() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["ports"][0]["containerPort"] == 3000  # BentoML's port in the image
    envs = {e["name"] for e in container["env"]}
    from falcon_service.config import Settings

    assert {e.removeprefix("FALCON_").lower() for e in envs} <= set(Settings.model_fields)
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
