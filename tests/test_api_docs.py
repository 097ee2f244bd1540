"""Every example in docs/api.md runs: its `bash` and `python` blocks, in order, against a
running API (`labdaq api`) over a database holding a run with samples."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dataout_fixtures import api_server, insert_samples, make_lab

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), flags=re.S)


# Only a hang fails: ~30 s quiet, its dozen subprocesses each start Python (and the
# API's start-up) again, several times slower on a loaded machine than the default 120 s.
@pytest.mark.timeout(600)
def test_every_api_doc_example_runs(sqlite_url: str, tmp_path: Path) -> None:
    found = blocks()
    assert {lang for lang, _ in found} == {"bash", "python"} and len(found) >= 6
    lab = asyncio.run(make_lab(sqlite_url))
    run_id = lab["run_ids"][0]
    insert_samples(sqlite_url, run_id, 12_000)
    with api_server(sqlite_url) as (base, _):
        env = {
            **os.environ,
            "LABDAQ_URL": base,
            "LABDAQ_TOKEN": lab["tokens"]["technician"],
            "LABDAQ_ADMIN_TOKEN": lab["tokens"]["admin"],
            "RUN_ID": str(run_id),
            "LABDAQ_DATABASE_URL": sqlite_url,  # for `labdaq export`
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        outputs = []
        for lang, code in found:
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [
                sys.executable, "-c", code]
            p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, f"{lang} example failed:\n{code}\n{p.stdout}\n{p.stderr}"
            outputs.append(p.stdout)
    text = "\n".join(outputs)
    # What the examples show is what the API holds.
    assert '"serial":"A123-0042"' in text and "A123-0042 L2026-12 2.5 Ah" in text
    assert "12000 samples" in text
    assert "EXP-001 12000 rows, sha256" in text
    assert "Test Time / s" in text
    assert "state completed cycle 0" in text, text
    at_1hz = re.search(r"(\d+) samples at 1 Hz", text)
    assert at_1hz and 1_000 <= int(at_1hz.group(1)) <= 1_200, text  # 1,200 s of run time
    assert (tmp_path / "run-from-cli.parquet").stat().st_size > 0
    # The Python client's example.
    assert re.search(r"client: EXP-001 completed 12000 rows, \d+ to plot", text), text
    assert "followed 12000 samples" in text and "error 404 Not found" in text
    assert (tmp_path / "run-from-client.parquet").stat().st_size > 0
    # The queue example (no engine here: the first run stays queued too).
    assert "queued at 2 and 3" in text
    assert "2030-01-06T02:30:00Z" in text, text
    # The abuse run: the channel's 105 V bounds it, not the cell's 4.2 V; the reason audited.
    assert "abuse limits: 105.0 V from instrument" in text, text
    assert "audited: ['UN 38.3 T7 overcharge, lot L-7']" in text, text
    # Users, tokens and the audit log: issued, used, revoked, refused; verified.
    assert "dana reads: 200" in text and "revoked token" in text and "\n401\n" in text
    assert re.search(r"\d+ \S+ t-admin admin user 'dana' created with role engineer", text)
    assert re.search(r"ok: \d+ records, head \d+:[0-9a-f]{64}", text), text
