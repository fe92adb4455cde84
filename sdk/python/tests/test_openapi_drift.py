"""The SDK's models, request bodies and routes checked against the live server's /v1/openapi.json.

A field the SDK reads that the schema lacks, a required schema field the SDK model lacks, a body key the
SDK sends that the request schema does not define, or a route/query parameter the server does not
document fails here with a diff.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

import tartarus
from tartarus._base import CREATE_FIELDS, EXEC_FIELDS, NEWER_ROUTES, QUERY_PARAMS, ROUTES
from tartarus._models import MODELS


@pytest.fixture(scope="module")
def openapi(server) -> Dict[str, Any]:  # type: ignore[no-untyped-def]
    with tartarus.Client(server.host, server.user_key) as c:
        doc = c.openapi()
    assert doc["openapi"].startswith("3.")
    return doc


def _schema(doc: Dict[str, Any], name: str) -> Dict[str, Any]:
    schemas = doc["components"]["schemas"]
    assert name in schemas, f"schema {name!r} is not in the OpenAPI document (has: {sorted(schemas)})"
    return schemas[name]  # type: ignore[no-any-return]


def _diff(model: str, schema: str, extra: List[str], missing_required: List[str], have: List[str]) -> str:
    lines = [f"{model} drifted from the schema {schema}:"]
    for f in extra:
        lines.append(f"  - {f}: in the SDK, not in the schema")
    for f in missing_required:
        lines.append(f"  + {f}: required by the schema, missing from the SDK")
    lines.append(f"  schema properties: {sorted(have)}")
    return "\n".join(lines)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_model_matches_schema(openapi: Dict[str, Any], model: Any) -> None:
    schema = _schema(openapi, model.__schema__)
    props = schema.get("properties", {})
    fields = model.api_fields()
    wire = set(fields.values())
    extra = sorted(wire - set(props))
    missing_required = sorted(set(schema.get("required", [])) - wire)
    assert not extra and not missing_required, _diff(
        model.__name__, model.__schema__, extra, missing_required, list(props)
    )


def test_models_cover_every_property(openapi: Dict[str, Any]) -> None:
    """Not only the required ones: a new optional field in a response view is noticed too."""
    report = []
    for model in MODELS:
        props = set(_schema(openapi, model.__schema__).get("properties", {}))
        missing = sorted(props - set(model.api_fields().values()))
        if missing:
            report.append(f"{model.__name__} ({model.__schema__}) lacks {missing}")
    assert not report, "\n".join(report)


@pytest.mark.parametrize(
    "schema_name,fields", [("CreateSandbox", CREATE_FIELDS), ("ExecBody", EXEC_FIELDS)]
)
def test_request_bodies_match_schema(openapi: Dict[str, Any], schema_name: str, fields: Dict[str, str]) -> None:
    props = set(_schema(openapi, schema_name).get("properties", {}))
    sent = set(fields.values())
    extra = sorted(sent - props)
    unexposed = sorted(props - sent)
    assert not extra, f"the SDK sends {extra} in {schema_name}, which defines only {sorted(props)}"
    assert not unexposed, f"{schema_name} has {unexposed} that the SDK cannot send (add a keyword)"


def test_preview_url_request_matches_schema(openapi: Dict[str, Any]) -> None:
    props = set(_schema(openapi, "SignedUrlRequest")["properties"])
    assert {"port", "ttl_s"} == props, f"SignedUrlRequest is now {sorted(props)}"


@pytest.mark.parametrize("method,path", ROUTES, ids=lambda x: str(x))
def test_route_exists(openapi: Dict[str, Any], method: str, path: str) -> None:
    paths = openapi["paths"]
    if path == "/v1/openapi.json":
        return  # the document does not describe itself
    assert path in paths, f"{method} {path}: no such path in the OpenAPI document"
    assert method.lower() in paths[path], f"{method} {path}: the path has only {sorted(paths[path])}"
    params = QUERY_PARAMS.get((method, path), [])
    documented = {p["name"] for p in paths[path][method.lower()].get("parameters", []) if p["in"] == "query"}
    missing = sorted(set(params) - documented)
    assert not missing, f"{method} {path}: the SDK sends query parameters {missing}; documented: {sorted(documented)}"


@pytest.mark.parametrize("method,path", NEWER_ROUTES, ids=lambda x: str(x))
def test_newer_route(openapi: Dict[str, Any], method: str, path: str) -> None:
    paths = openapi["paths"]
    if path not in paths:
        pytest.skip(f"{method} {path}: this server predates it")
    assert method.lower() in paths[path]


def test_set_timeout_schema(openapi: Dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    if "SetTimeout" not in schemas:
        pytest.skip("this server has no POST /v1/sandboxes/{id}/timeout")
    assert set(schemas["SetTimeout"]["properties"]) == {"timeout_s"}
    assert "deadline_ms" in schemas["Deadline"]["properties"]
