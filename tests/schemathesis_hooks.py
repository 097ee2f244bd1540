"""schemathesis hook for tests/test_api_schemathesis.py: the runs never revoke the tokens
they test with.

schemathesis learns real ids from responses (GET /api/v1/tokens lists them) and calls
`POST /api/v1/tokens/{token_id}/revoke` with them; the admin's run revoked its own token
and every role's, and every request after that answered 401, so the rest of each run
tested nothing but the refusal. A call that would revoke one of the test's tokens
(``LABDAQ_ST_KEEP_TOKEN_IDS``, comma-separated ids) revokes the spare token
``LABDAQ_ST_SPARE_TOKEN_ID`` instead: the same operation and body, a token nobody uses.
The test's tokens have no user, so no user operation can disable them.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

REVOKE = "POST /api/v1/tokens/{token_id}/revoke"
KEEP = {s.strip() for s in os.environ.get("LABDAQ_ST_KEEP_TOKEN_IDS", "").split(",") if s.strip()}
SPARE = os.environ.get("LABDAQ_ST_SPARE_TOKEN_ID", "")


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.operation.label != REVOKE or not SPARE or not case.path_parameters:
        return
    if str(case.path_parameters.get("token_id")) in KEEP:
        case.path_parameters = {**case.path_parameters, "token_id": int(SPARE)}
