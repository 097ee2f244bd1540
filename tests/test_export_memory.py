"""A large export streams: the API process's peak memory barely grows while it serves
1.5 M samples as Parquet and as CSV over real HTTP (a memory bound, not a timing one)."""

from __future__ import annotations

import asyncio

import httpx
import pyarrow.parquet as pq
import pytest

from tests.dataout_fixtures import api_server, insert_samples, make_lab, peak_rss_bytes

ROWS = 1_500_000
# The run as Arrow columns alone is ~130 MB and as CSV text ~210 MB, so an export that
# held the run in memory would exceed this; a streamed one holds one chunk at a time.
MAX_GROWTH = 100 * 1024 * 1024


@pytest.mark.slow  # make test-slow: keeps make test within its budget
def test_large_export_streams_with_bounded_memory(sqlite_url: str, tmp_path) -> None:
    lab = asyncio.run(make_lab(sqlite_url, runs=2))
    big, small = lab["run_ids"]
    insert_samples(sqlite_url, big, ROWS)
    insert_samples(sqlite_url, small, 2_000)
    headers = {"Authorization": f"Bearer {lab['tokens']['engineer']}"}
    with api_server(sqlite_url) as (base, proc):
        # Warm up: every import and the first ADBC connection happen here, not below.
        for fmt in ("parquet", "csv"):
            r = httpx.get(f"{base}/api/v1/runs/{small}/export", params={"format": fmt},
                          headers=headers, timeout=120)
            assert r.status_code == 200
        before = peak_rss_bytes(proc.pid)
        for fmt in ("parquet", "csv"):
            out = tmp_path / f"big.{fmt}"
            with httpx.stream("GET", f"{base}/api/v1/runs/{big}/export",
                              params={"format": fmt}, headers=headers, timeout=600) as r:
                assert r.status_code == 200
                with out.open("wb") as fh:
                    for chunk in r.iter_bytes():
                        fh.write(chunk)
            if fmt == "parquet":
                assert pq.read_metadata(out).num_rows == ROWS
            else:
                with out.open("rb") as fh:
                    lines = sum(1 for ln in fh if not ln.startswith(b"#"))
                assert lines == ROWS + 1
        growth = peak_rss_bytes(proc.pid) - before
    print(f"export of {ROWS} rows x2 formats: API peak RSS {before / 2**20:.0f} MiB "
          f"-> +{growth / 2**20:.1f} MiB")
    assert growth < MAX_GROWTH, f"peak RSS grew {growth / 2**20:.0f} MiB"
