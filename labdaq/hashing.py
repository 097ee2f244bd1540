"""Content hashes of JSON-able documents: stable across key order and formatting."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_hash(doc: Any) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
