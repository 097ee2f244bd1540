"""labdaq.client against a real API server over HTTP, on a run with stored samples."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from labdaq.client import SAMPLE_SCHEMA, Client, LabdaqError
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dataout_fixtures import api_server, insert_samples, make_lab
from tests.db_fixtures import upgrade

N = 25_000  # three `samples` messages in the stream (it sends at most 10,000 a message)


async def _add_cycles(url: str, run_id: int) -> None:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            for k in range(3):
                s.add(m.Cycle(run_id=run_id, cycle_index=k, start_t_s=100.0 * k,
                              end_t_s=100.0 * k + 99.5, charge_capacity_ah=4.8 - k / 100,
                              discharge_capacity_ah=4.7 - k / 100, charge_energy_wh=18.0,
                              discharge_energy_wh=17.0, coulombic_efficiency=0.98,
                              energy_efficiency=0.94, mean_charge_voltage_v=3.8,
                              mean_discharge_voltage_v=3.6))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    db = tmp_path_factory.mktemp("client") / "labdaq.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    info = asyncio.run(make_lab(url))
    run_id = info["run_ids"][0]
    insert_samples(url, run_id, N)
    asyncio.run(_add_cycles(url, run_id))
    with api_server(url) as (base, _):
        yield {**info, "run_id": run_id, "base": base, "db": db,
               "token": info["tokens"]["engineer"]}


def stored(db: Path, run_id: int) -> dict[str, list[Any]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            f"SELECT {', '.join(SAMPLE_SCHEMA.names)} FROM samples WHERE run_id = ? ORDER BY seq",
            (run_id,),
        ).fetchall()
    return {c: list(v) for c, v in zip(SAMPLE_SCHEMA.names, zip(*rows, strict=True),
                                       strict=True)}


def test_lists_runs_cells_and_cycles(lab: dict[str, Any]) -> None:
    with Client(lab["base"], lab["token"]) as c:
        assert [r["id"] for r in c.runs()] == [lab["run_id"]]
        assert c.run(lab["run_id"])["state"] == "completed"
        cells = c.cells()
        assert [x["serial"] for x in cells] == ["EXP-001"] and cells[0]["lot"] == "L7"
        assert c.cell(lab["cell_id"])["run_ids"] == [lab["run_id"]]
        cycles = c.cycles(lab["run_id"])
        assert cycles["cycle_index"].to_pylist() == [0, 1, 2]
        assert cycles["discharge_capacity_ah"].to_pylist() == [4.7 - k / 100 for k in range(3)]
        assert c.eis(lab["run_id"]) == []
        assert isinstance(c.events(lab["run_id"]), list)


def test_samples_full_resolution_equal_the_stored_rows(lab: dict[str, Any]) -> None:
    want = stored(lab["db"], lab["run_id"])
    with Client(lab["base"], lab["token"]) as c:
        table = c.samples(lab["run_id"])
        assert table.schema == SAMPLE_SCHEMA and table.num_rows == N
        assert table.to_pydict() == want  # floats exact, missing temperatures null
        # One page, then the rest from its cursor: the same rows.
        page = c.samples(lab["run_id"], after_seq=0, limit=7_000)
        rest = c.samples(lab["run_id"], after_seq=page["seq"][-1].as_py())
        assert page.num_rows == 7_000 and page["seq"].to_pylist() + rest["seq"].to_pylist() \
            == want["seq"]
        window = c.samples(lab["run_id"], t_from=100.0, t_to=200.0)
        assert window["seq"].to_pylist() == [
            s for s, t in zip(want["seq"], want["t_s"], strict=True) if 100.0 <= t <= 200.0]
        one = c.samples(lab["run_id"], cycle=2)
        assert set(one["cycle_index"].to_pylist()) == {2} and one.num_rows == want[
            "cycle_index"].count(2)


def test_downsampled_samples_are_at_most_n_stored_rows(lab: dict[str, Any]) -> None:
    want = stored(lab["db"], lab["run_id"])
    by_seq = {s: i for i, s in enumerate(want["seq"])}
    with Client(lab["base"], lab["token"]) as c:
        table = c.samples(lab["run_id"], points=500)
    seqs = table["seq"].to_pylist()
    assert 100 < len(seqs) <= 500 and seqs == sorted(seqs)
    assert seqs[0] == want["seq"][0] and seqs[-1] == want["seq"][-1]
    volts = table["voltage_v"].to_pylist()
    assert all(want["voltage_v"][by_seq[s]] == v for s, v in zip(seqs, volts, strict=True))
    assert min(volts) == min(want["voltage_v"])  # the extremes are kept


def test_export_to_parquet_reads_back(lab: dict[str, Any], tmp_path: Path) -> None:
    with Client(lab["base"], lab["token"]) as c:
        path = c.export(lab["run_id"], "parquet", tmp_path / "run.parquet")
    table = pq.read_table(path)
    want = stored(lab["db"], lab["run_id"])
    assert table.num_rows == N and table["voltage_v"].to_pylist() == want["voltage_v"]
    assert not (tmp_path / "run.parquet.part").exists()


def test_problem_raised_with_its_status(lab: dict[str, Any], tmp_path: Path) -> None:
    with Client(lab["base"], lab["token"]) as c:
        with pytest.raises(LabdaqError) as e:
            c.run(999_999)
        assert e.value.status == 404 and e.value.title == "Not found" and e.value.detail
        with pytest.raises(LabdaqError) as e:
            c.samples(lab["run_id"], points=3)  # below the API's bound of 10
        assert e.value.status == 422 and any("points" in x["loc"] for x in e.value.errors)
        with pytest.raises(LabdaqError) as e:
            c.export(999_999, "csv", tmp_path / "x.csv")
        assert e.value.status == 404 and not (tmp_path / "x.csv").exists()
    with Client(lab["base"], "ldq_not-a-token") as c, pytest.raises(LabdaqError) as e:
        c.cells()
    assert e.value.status == 401


class DroppingProxy:
    """A TCP proxy to the API that cuts its first connection after ``cut_after`` bytes of
    the answer, as a network drop would; later connections pass whole."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, limit), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while chunk := src.recv(65536):
                if limit is not None and sent + len(chunk) >= limit:
                    dst.sendall(chunk[: limit - sent])
                    break
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def seqs_of(msgs: list[Any]) -> list[int]:
    return [s for x in msgs if x.event == "samples" for s in x.data["seq"]]


def test_follow_resumes_after_a_dropped_connection(lab: dict[str, Any]) -> None:
    # The first `samples` message holds 10,000 rows (about 2 MB): cut inside the second.
    proxy = DroppingProxy(lab["base"], cut_after=3_000_000)
    try:
        with Client(proxy.url, lab["token"]) as c:
            msgs = list(c.follow(lab["run_id"]))
    finally:
        proxy.close()
    assert proxy.connections == 2  # it was dropped once and reopened
    assert seqs_of(msgs) == list(range(1, N + 1))  # no gap, no repeat
    assert [x.data["state"] for x in msgs if x.event == "state"] == ["completed"]


def test_follow_from_a_last_event_id(lab: dict[str, Any]) -> None:
    with Client(lab["base"], lab["token"]) as c:
        first = next(iter(c.follow(lab["run_id"])))
        assert first.event == "samples" and first.id
        rest = list(c.follow(lab["run_id"], last_event_id=first.id))
    assert seqs_of([first, *rest]) == list(range(1, N + 1))
