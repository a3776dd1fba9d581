"""``deploy/k8s`` manifests are well formed (no cluster): each document validates against a schema written
from the upstream definitions (apps/v1 Deployment, v1 Service, KubeRay ray.io/v1 RayService, Gateway API
Inference Extension inference.networking.k8s.io/v1 InferencePool), and the documents agree with each other
and with the code (labels, ports, probe paths, the Serve application's import path and settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.cli import build_parser
from server.config import ScaleSettings, Settings

K8S = Path(__file__).parents[2] / "deploy" / "k8s"

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}
_LABELS = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
_PORT_NUMBER = {"type": "integer", "minimum": 1, "maximum": 65535}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": _NAME,
        "image": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": _PORT_NUMBER, "name": {"type": "string", "maxLength": 15}},
            },
        },
        "resources": {
            "type": "object",
            "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}},
            "additionalProperties": False,
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": _LABELS}},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            },
        },
    },
}
SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("apps/v1", "Deployment"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "template"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 0},
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                    },
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
    ("v1", "Service"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "ports"],
                "properties": {
                    "selector": _LABELS,
                    "ports": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {"port": _PORT_NUMBER},
                        },
                    },
                },
            },
        },
    },
    ("inference.networking.k8s.io/v1", "InferencePool"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "targetPorts", "endpointPickerRef"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "targetPorts": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 8,
                        "items": {
                            "type": "object",
                            "required": ["number"],
                            "additionalProperties": False,
                            "properties": {"number": _PORT_NUMBER},
                        },
                    },
                    "endpointPickerRef": {
                        "type": "object",
                        "required": ["name", "port"],
                        "additionalProperties": False,
                        "properties": {
                            "group": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": _NAME,
                            "port": {
                                "type": "object",
                                "required": ["number"],
                                "properties": {"number": _PORT_NUMBER},
                            },
                            "failureMode": {"enum": ["FailOpen", "FailClose"]},
                        },
                    },
                },
            },
        },
    },
    ("ray.io/v1", "RayService"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["serveConfigV2", "rayClusterConfig"],
                "properties": {
                    "serveConfigV2": {"type": "string"},
                    "rayClusterConfig": {
                        "type": "object",
                        "required": ["headGroupSpec"],
                        "properties": {
                            "rayVersion": {"type": "string"},
                            "headGroupSpec": {
                                "type": "object",
                                "required": ["template"],
                                "properties": {
                                    "rayStartParams": {"type": "object"},
                                    "template": _POD_TEMPLATE,
                                },
                            },
                            "workerGroupSpecs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["groupName", "template"],
                                    "properties": {
                                        "groupName": {"type": "string"},
                                        "replicas": {"type": "integer", "minimum": 0},
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer", "minimum": 0},
                                        "rayStartParams": {"type": "object"},
                                        "template": _POD_TEMPLATE,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def documents(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("name", ["rayservice.yaml", "inference-gateway.yaml"])
def test_every_document_validates_against_its_schema(name: str) -> None:
    for doc in yaml.safe_load_all((K8S / name).read_text()):
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, f"{name}: no schema for {doc['apiVersion']} {doc['kind']}"
        jsonschema.Draft202012Validator(schema).validate(doc)


def test_the_schemas_refuse_what_kubernetes_would() -> None:
    pool = documents("inference-gateway.yaml")["InferencePool"]
    broken = {**pool, "spec": {**pool["spec"], "targetPortNumber": 8000}}  # the v1alpha2 field name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")])


def test_the_gateway_example_agrees_with_itself_and_the_server() -> None:
    docs = documents("inference-gateway.yaml")
    deployment, service, pool = docs["Deployment"], docs["Service"], docs["InferencePool"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # the args are real serve flags
    args = build_parser().parse_args(["serve", *container["args"]])
    assert args.port == str(ports["http"])


def test_the_rayservice_runs_our_application_with_real_settings() -> None:
    service = documents("rayservice.yaml")["RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "server.scale.deployments:build_app"
    assert app["route_prefix"] == "/"
    fields = set(Settings.model_fields) | set(ScaleSettings.model_fields)
    assert set(app["args"]) <= fields, set(app["args"]) - fields
    engine = {k: v for k, v in app["args"].items() if k in Settings.model_fields}
    scale = {k: v for k, v in app["args"].items() if k in ScaleSettings.model_fields}
    Settings.model_validate(engine)
    assert ScaleSettings.model_validate(scale).replicas >= 1
