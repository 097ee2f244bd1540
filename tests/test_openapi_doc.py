"""OpenAPI: every operation has a stable operationId and request and response examples
that are valid against their own schemas."""

from __future__ import annotations

from typing import Any

import jsonschema_rs  # schemathesis's validator (dev dependency)
import pytest

from labdaq.api.app import create_app
from labdaq.config import Settings

#: Operation ids clients rely on (generated clients name their methods after them): each
#: keeps its id and its method and path. A new operation adds a line; none changes.
OPERATIONS: dict[str, tuple[str, str]] = {
    "health": ("GET", "/health"),
    "ready": ("GET", "/ready"),
    "metrics": ("GET", "/metrics"),
    "get_channels": ("GET", "/api/v1/channels"),
    "get_queue": ("GET", "/api/v1/channels/{channel_id}/queue"),
    "create_run": ("POST", "/api/v1/runs"),
    "list_runs": ("GET", "/api/v1/runs"),
    "get_run": ("GET", "/api/v1/runs/{run_id}"),
    "move_run": ("PATCH", "/api/v1/runs/{run_id}"),
    "confirm_cell": ("POST", "/api/v1/runs/{run_id}/confirm-cell"),
    "stop_run": ("POST", "/api/v1/runs/{run_id}/stop"),
    "pause_run": ("POST", "/api/v1/runs/{run_id}/pause"),
    "resume_run": ("POST", "/api/v1/runs/{run_id}/resume"),
    "get_cycles": ("GET", "/api/v1/runs/{run_id}/cycles"),
    "get_steps": ("GET", "/api/v1/runs/{run_id}/steps"),
    "get_events": ("GET", "/api/v1/runs/{run_id}/events"),
    "get_eis": ("GET", "/api/v1/runs/{run_id}/eis"),
    "get_templates": ("GET", "/api/v1/protocols/templates"),
    "get_template": ("GET", "/api/v1/protocols/templates/{name}"),
    "get_instruments": ("GET", "/api/v1/instruments"),
    "put_instruments": ("PUT", "/api/v1/instruments"),
    "list_cells": ("GET", "/api/v1/cells"),
    "create_cell": ("POST", "/api/v1/cells"),
    "get_cell": ("GET", "/api/v1/cells/{cell_id}"),
    "update_cell": ("PATCH", "/api/v1/cells/{cell_id}"),
    "get_cell_events": ("GET", "/api/v1/cells/{cell_id}/events"),
    "get_samples": ("GET", "/api/v1/runs/{run_id}/samples"),
    "export_run": ("GET", "/api/v1/runs/{run_id}/export"),
    "export_run_metadata": ("GET", "/api/v1/runs/{run_id}/export/metadata"),
    "export_cell": ("GET", "/api/v1/cells/{cell_id}/export"),
    "stream_run": ("GET", "/api/v1/runs/{run_id}/stream"),
    "stream_lab": ("GET", "/api/v1/stream"),
    "get_evaluation": ("GET", "/api/v1/runs/{run_id}/evaluation"),
    "store_evaluation": ("POST", "/api/v1/runs/{run_id}/evaluation"),
    "add_observations": ("POST", "/api/v1/runs/{run_id}/observations"),
    "get_observations": ("GET", "/api/v1/runs/{run_id}/observations"),
    "get_report": ("GET", "/api/v1/runs/{run_id}/report"),
    "get_cell_evaluation": ("GET", "/api/v1/cells/{cell_id}/evaluation"),
    "list_users": ("GET", "/api/v1/users"),
    "create_user": ("POST", "/api/v1/users"),
    "update_user": ("PATCH", "/api/v1/users/{user_id}"),
    "list_tokens": ("GET", "/api/v1/tokens"),
    "create_token": ("POST", "/api/v1/tokens"),
    "revoke_token": ("POST", "/api/v1/tokens/{token_id}/revoke"),
    "list_audit": ("GET", "/api/v1/audit"),
    "get_head": ("GET", "/api/v1/audit/head"),
    "whoami": ("GET", "/api/v1/whoami"),
    "lab": ("GET", "/api/v1/lab"),
    "alarms": ("GET", "/api/v1/alarms"),
    "acknowledge": ("POST", "/api/v1/alarms/{event_id}/ack"),
}
JSON = ("application/json", "application/problem+json")


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'labdaq.db'}"
    return create_app(Settings(database_url=url)).openapi()


def _ops(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def _valid(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> str | None:
    # The schema is validated inside the whole document so its $refs resolve.
    root = {**schema, "components": doc.get("components", {})}
    errors = [e.message for e in jsonschema_rs.validator_for(root).iter_errors(value)]
    return "; ".join(errors) or None


def test_every_operation_has_a_stable_unique_operation_id(doc: dict[str, Any]) -> None:
    ids = {op["operationId"]: (method, path) for method, path, op in _ops(doc)}
    assert len(ids) == len(_ops(doc)), "operationIds are not unique"
    for op_id, where in OPERATIONS.items():
        assert ids.get(op_id) == where, f"operationId {op_id} moved or was renamed"
    # Short names, not FastAPI's default (the function name + path + method).
    assert all("api_v1" not in i and " " not in i for i in ids)


def test_every_operation_has_valid_request_and_response_examples(doc: dict[str, Any]) -> None:
    problems: list[str] = []
    for method, path, op in _ops(doc):
        where = f"{method} {path}"
        for param in op.get("parameters", []):
            if "example" not in param:
                problems.append(f"{where}: parameter {param['name']} has no example")
            elif err := _valid(doc, param["schema"], param["example"]):
                problems.append(f"{where}: parameter {param['name']} example: {err}")
        for media_type, media in op.get("requestBody", {}).get("content", {}).items():
            if "example" not in media:
                problems.append(f"{where}: request {media_type} has no example")
            elif media_type in JSON and (err := _valid(doc, media["schema"], media["example"])):
                problems.append(f"{where}: request example: {err}")
        with_example = 0
        for code, resp in op["responses"].items():
            for media_type, media in resp.get("content", {}).items():
                if "example" in media:
                    with_example += 1
                    if (
                        media_type in JSON
                        and "schema" in media
                        and (err := _valid(doc, media["schema"], media["example"]))
                    ):
                        problems.append(f"{where}: {code} {media_type} example: {err}")
                elif media_type in JSON:
                    problems.append(f"{where}: {code} {media_type} has no example")
        if not with_example:
            problems.append(f"{where}: no response example")
    assert not problems, "\n".join(problems)


def test_a_problem_example_carries_its_own_status(doc: dict[str, Any]) -> None:
    resp = doc["paths"]["/api/v1/runs/{run_id}"]["get"]["responses"]["404"]
    example = resp["content"]["application/problem+json"]["example"]
    assert example["status"] == 404 and example["title"]
