"""A large export streams: the API process's peak memory barely grows while it serves
10 M samples as Parquet and as CSV over real HTTP (a memory bound, not a timing one)."""

from __future__ import annotations

import asyncio
import io

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy.engine import make_url

from tests.dataout_fixtures import (
    api_server,
    insert_samples,
    insert_samples_sql,
    make_lab,
    peak_rss_bytes,
)

ROWS = 10_000_000
# The run as Arrow columns alone is ~900 MB and as CSV text over 1 GB, so an export that
# held the run (or any sizeable part of it) in memory would exceed this; a streamed one
# holds one chunk at a time.
MAX_GROWTH = 100 * 1024 * 1024
# The Parquet footer (schema, row groups, labdaq's description) is in the file's tail.
TAIL_BYTES = 8 * 1024 * 1024


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_large_export_streams_with_bounded_memory(sqlite_url: str) -> None:
    lab = asyncio.run(make_lab(sqlite_url, runs=2))
    big, small = lab["run_ids"]
    insert_samples_sql(make_url(sqlite_url).database or "", big, ROWS)
    insert_samples(sqlite_url, small, 2_000)
    headers = {"Authorization": f"Bearer {lab['tokens']['engineer']}"}
    with api_server(sqlite_url) as (base, proc):
        # Warm up: every import and the first reader process happen here, not below.
        for fmt in ("parquet", "csv"):
            r = httpx.get(f"{base}/api/v1/runs/{small}/export", params={"format": fmt},
                          headers=headers, timeout=120)
            assert r.status_code == 200
        before = peak_rss_bytes(proc.pid)
        for fmt in ("parquet", "csv"):
            tail = b""
            lines = 0
            with httpx.stream("GET", f"{base}/api/v1/runs/{big}/export",
                              params={"format": fmt}, headers=headers, timeout=1800) as r:
                assert r.status_code == 200
                # Counted as it arrives: the client holds no more of the file than the API.
                for chunk in r.iter_bytes():
                    if fmt == "csv":
                        lines += chunk.count(b"\n") - chunk.count(b"\n#") - chunk.startswith(
                            b"#")
                    else:
                        tail = (tail + chunk)[-TAIL_BYTES:]
            if fmt == "parquet":
                assert pq.read_metadata(io.BytesIO(tail)).num_rows == ROWS
            else:
                assert lines == ROWS + 1  # the header line and every sample
        growth = peak_rss_bytes(proc.pid) - before
    print(f"export of {ROWS} rows x2 formats: API peak RSS {before / 2**20:.0f} MiB "
          f"-> +{growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH, f"peak RSS grew {growth / 2**20:.0f} MiB"
