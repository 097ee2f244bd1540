"""`labdaq export RUN --format parquet -o FILE` writes the same export as the API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pyarrow.parquet as pq

from labdaq import export
from tests.dataout_fixtures import insert_samples, make_lab


def _digest(path: str) -> str:
    d = export.DataDigest()
    for b in pq.read_table(path).to_batches():
        d.update(b)
    return d.hexdigest()


def test_cli_export_parquet_and_errors(sqlite_url: str, tmp_path) -> None:
    lab = asyncio.run(make_lab(sqlite_url))
    run_id = lab["run_ids"][0]
    insert_samples(sqlite_url, run_id, 5_000)
    out = tmp_path / "r.parquet"
    cmd = [sys.executable, "-m", "labdaq.cli", "export", str(run_id), "--format", "parquet",
           "-o", str(out), "--database-url", sqlite_url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["rows"] == 5_000 and report["path"] == str(out)
    f = pq.ParquetFile(out)
    assert f.metadata.num_rows == 5_000
    kv = f.metadata.metadata
    assert kv[b"labdaq.data_sha256"].decode() == report["data_sha256"] == _digest(str(out))
    assert json.loads(kv[b"labdaq.cell"])["serial"] == "EXP-001"
    # A run that does not exist: a message and a non-zero exit, no file.
    missing = tmp_path / "none.parquet"
    cmd[4] = "999"
    cmd[cmd.index(str(out))] = str(missing)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no run 999" in p.stderr and not missing.exists()
