"""OpenAPI operation ids and examples.

Operation ids are the route functions' names (``export_run``, ``create_cell``): unique in
the app (tests/test_openapi_doc.py checks), short, and unchanged when a path or a tag
moves, unlike FastAPI's default (the function name + path + method), so generated clients
keep their method names.

Examples: every parameter, JSON request body and response content without one gets an
``example`` derived from its schema (:func:`example_for`): a schema's own
``examples``/``default``/``enum`` first, else a value of the declared type within its
bounds. A problem+json response's example carries its own status. Text responses (CSV,
Server-Sent Events, Prometheus) get a short literal example; binary Parquet gets none.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi.routing import APIRoute

#: Literal examples of the non-JSON responses, by media type.
TEXT_EXAMPLES = {
    "text/csv": "# labdaq export\n# format: csv\nseq,t_s,ts_utc,step_index,cycle_index,"
    "voltage_v,current_a,temperature_c,step_capacity_ah,step_energy_wh,flags\n"
    "1,1,1764979200,0,0,3.6123,2.45,25.1,0.00068,0.00246,0\n# rows: 1\n",
    "text/event-stream": 'id: 1:42\nevent: sample\ndata: {"run_id": 1, "seq": 42, '
    '"t_s": 42.0, "voltage_v": 3.71, "current_a": 2.45}\n\n',
    "text/plain": "# HELP labdaq_samples_stored_total samples committed, every run\n"
    "# TYPE labdaq_samples_stored_total counter\nlabdaq_samples_stored_total 12345.0\n",
    "text/html": "<!doctype html><title>labdaq</title>",
}

_FORMATS = {
    "date-time": "2026-12-06T09:30:00Z",
    "date": "2026-12-06",
    "time": "09:30:00",
    "email": "engineer@lab.example",
    "uri": "https://lab.example/api/v1/runs/1",
    "duration": "P1D",
    "uuid": "3f1c2b9e-8a4d-4e6b-9c1a-5d2e7f8a9b0c",
}
_MAX_DEPTH = 8
#: Tried in turn for a string whose pattern "example" does not match.
_PATTERN_CANDIDATES = ("K", "A", "a", "1", "example-1", "sha256:" + "0" * 64, "0" * 64)


def operation_id(route: APIRoute) -> str:
    """FastAPI ``generate_unique_id_function``: the route function's name."""
    return route.name


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    value: float = 1 if integer else 1.5
    if lo is not None and value <= lo:
        value = lo + 1 if integer else lo + (1.0 if hi is None else (hi - lo) / 2)
    if hi is not None and value >= hi:
        value = hi - 1 if "exclusiveMaximum" in schema and integer else hi
        if not integer and "exclusiveMaximum" in schema:
            value = hi - ((hi - lo) / 2 if lo is not None else 1.0)
    return int(value) if integer else float(value)


def example_for(doc: dict[str, Any], schema: dict[str, Any], depth: int = 0) -> Any:
    """A value valid against ``schema`` (OpenAPI 3.1 / JSON Schema), refs resolved in
    ``doc``."""
    schema = _resolve(doc, schema)
    for key in ("examples",):
        if isinstance(schema.get(key), list) and schema[key]:
            return copy.deepcopy(schema[key][0])
    for key in ("example", "const", "default"):
        if key in schema:
            return copy.deepcopy(schema[key])
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [_resolve(doc, s) for s in schema[key]]
            usable = [s for s in options if s.get("type") != "null"] or options
            return example_for(doc, usable[0], depth + 1)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = example_for(doc, part, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
            else:
                return value
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        if depth > _MAX_DEPTH:
            return {}
        props = schema.get("properties", {})
        out = {name: example_for(doc, sub, depth + 1) for name, sub in props.items()}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra and len(out) < int(schema.get("minProperties", 0)):
            out["example"] = example_for(doc, extra, depth + 1)
        return out
    if kind == "array":
        if depth > _MAX_DEPTH:
            return []
        item = example_for(doc, schema.get("items", {}), depth + 1)
        return [item] * max(1, int(schema.get("minItems", 1)))
    if kind == "integer":
        return _number(schema, integer=True)
    if kind == "number":
        return _number(schema, integer=False)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = _FORMATS.get(schema.get("format", ""), "example")
    pattern = schema.get("pattern")
    if pattern and not re.search(pattern, text):
        text = next((c for c in _PATTERN_CANDIDATES if re.search(pattern, c)), text)
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    if len(text) < lo:
        text = text + "x" * (lo - len(text))
    if hi is not None:
        text = text[: int(hi)]
    return text


def problem_example(status: int, generated: dict[str, Any]) -> dict[str, Any]:
    """A problem+json body as the API writes it for ``status``."""
    from labdaq.api.problems import _TITLES, _TYPES

    return {
        **generated,
        "type": _TYPES.get(status, "about:blank"),
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": _DETAILS.get(status, generated.get("detail", "")),
        "instance": "/api/v1/runs/1",
        "errors": [{"loc": "body.charge_current_a", "msg": "must be > 0"}] if status == 422 else [],
    }


_DETAILS = {
    400: "the request cannot be processed as sent",
    401: "missing, unknown, expired or revoked token",
    403: "this action needs the engineer role",
    404: "no run 1",
    409: "run 1 is completed; it cannot be paused",
    413: "request body over the limit",
    422: "the request's values are invalid",
    503: "the database is unavailable; retry later",
}


def add_examples(doc: dict[str, Any]) -> None:
    """Fill in the examples of every operation of the OpenAPI document ``doc``."""
    for path_item in doc.get("paths", {}).values():
        for op in path_item.values():
            if not isinstance(op, dict):
                continue
            for param in op.get("parameters", []):
                if "example" not in param and "schema" in param:
                    param["example"] = example_for(doc, param["schema"])
            body = op.get("requestBody", {}).get("content", {})
            for media in body.values():
                if "schema" in media and "example" not in media:
                    media["example"] = example_for(doc, media["schema"])
            for code, resp in op.get("responses", {}).items():
                for media_type, media in resp.get("content", {}).items():
                    if "example" in media or "examples" in media:
                        continue
                    if media_type.endswith("json") and "schema" in media:
                        value = example_for(doc, media["schema"])
                        if media_type == "application/problem+json" and code.isdigit():
                            value = problem_example(int(code), value)
                        media["example"] = value
                    elif media_type in TEXT_EXAMPLES:
                        media["example"] = TEXT_EXAMPLES[media_type]
