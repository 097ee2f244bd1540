"""schemathesis hooks for tests/test_api_schemathesis.py: the runs never revoke the
tokens they test with, and a URL-like string in a response does not crash schemathesis.

schemathesis learns real ids from responses (GET /api/v1/tokens lists them) and calls
`POST /api/v1/tokens/{token_id}/revoke` with them; the admin's run revoked its own token
and every role's, and every request after that answered 401, so the rest of each run
tested nothing but the refusal. A call that would revoke one of the test's tokens
(``LABDAQ_ST_KEEP_TOKEN_IDS``, comma-separated ids) revokes the spare token
``LABDAQ_ST_SPARE_TOKEN_ID`` instead: the same operation and body, a token nobody uses.
The test's tokens have no user, so no user operation can disable them.

schemathesis (4.32) scans 2xx JSON bodies for same-origin URLs to infer stateful links,
and `urllib.parse.urlsplit` raises ValueError ("Invalid IPv6 URL") for a string such as
"http://[x" that a run stored in a free-text field and read back: the whole run ended
with "Test Execution Error". Such a string is not a link, so the scan skips it.

Its inferred links read a field of every record of a list (``GET /api/v1/audit`` ->
``run_id`` of each record) and follow one of the values, null ones included: the deep run
sent ``GET /api/v1/runs/None/observations`` and reported the 422 as a schema-valid request
rejected. schemathesis already skips a link whose one value is null; the null values of a
list are skipped the same way.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis.engine import observations
from schemathesis.specs.openapi import expressions

REVOKE = "POST /api/v1/tokens/{token_id}/revoke"
KEEP = {s.strip() for s in os.environ.get("LABDAQ_ST_KEEP_TOKEN_IDS", "").split(",") if s.strip()}
SPARE = os.environ.get("LABDAQ_ST_SPARE_TOKEN_ID", "")


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.operation.label != REVOKE or not SPARE or not case.path_parameters:
        return
    if str(case.path_parameters.get("token_id")) in KEEP:
        case.path_parameters = {**case.path_parameters, "token_id": int(SPARE)}


_same_origin_path = observations._same_origin_path


def _same_origin_path_or_none(value: str, origin: tuple[str, str]) -> str | None:
    try:
        return _same_origin_path(value, origin)
    except ValueError:  # not a URL urlsplit can read, so not a link to follow
        return None


observations._same_origin_path = _same_origin_path_or_none


_resolve_pointer_all = expressions.resolve_pointer_all


def _resolve_pointer_all_present(document: Any, pointer: Any) -> Any:
    matches = _resolve_pointer_all(document, pointer)
    if isinstance(matches, list):
        return [m for m in matches if m is not None]
    return matches


expressions.resolve_pointer_all = _resolve_pointer_all_present
