"""Several acquisition nodes and API processes on one PostgreSQL (labdaq.nodes).

Real processes, all on one throwaway PostgreSQL database: node a (``labdaq sim`` and
``labdaq engine --role node``), node b (``labdaq serve --role node --sim``: its own
simulated lab and engine), each driving only its own lab's instruments, and two API
processes (``labdaq serve --role api``). Runs are created through either
API; the node whose instrument holds the channel starts them. A node killed with SIGKILL
shows as ``node_down`` in the API, and one alert says so (an API process writes the
change once, labdaq.node_watch); restarted, it resumes its run with every committed
sample kept and none duplicated, the other node's runs are never touched, and one more
alert says it is back. A run's live stream is served by an API process that is on no
node: samples travel through the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from labdaq import processes
from labdaq.auth import create_token
from labdaq.cli import _register_sim_lab, node_lab
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.ports import free_port
from tests.service_wait import SERVICE_START_S
from tests.sim_idle import make_idle_safe
from tests.test_alerts import _Receiver
from tests.test_alerts import receiver as receiver  # the webhook receiver fixture
from tests.test_live_stream import read_stream, seqs
from tests.test_recovery_kill9 import _alive, _children

SPEED = 100.0  # simulated seconds per wall second, the labs' and the nodes' alike
DOWN_AFTER_S = 3.0  # the APIs' node_down_after_s


def _charge(duration_s: float) -> dict[str, Any]:
    """A C/5 charge for ``duration_s`` simulated seconds."""
    return {"schema_version": 1, "name": f"charge {duration_s:g} s",
            "steps": [{"step": "cc", "rate_c": 0.2, "until": {"duration_s": duration_s}}]}


@dataclass
class Cluster:
    url: str
    tmp: Path
    children: processes.Children
    hook: str = ""  # the API processes' alert webhook
    token: str = ""
    apis: list[str] = field(default_factory=list)
    nodes: dict[str, processes.Proc] = field(default_factory=dict)
    labs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        return processes.child_env(drop=("LABDAQ_CONFIG", "LABDAQ_DATABASE_URL"),
                                   LABDAQ_NODE_DOWN_AFTER_S=str(DOWN_AFTER_S),
                                   LABDAQ_MAX_RESUME_GAP_S="100000",
                                   LABDAQ_ALERTS=json.dumps([{"webhook": self.hook}]),
                                   LABDAQ_ALERTS_POLL_S="0.2", **extra)

    def start_node(self, node: str, tag: str = "") -> processes.Proc:
        data = self.tmp / f"node-{node}"
        data.mkdir(exist_ok=True)
        proc = self.children.spawn(
            f"node-{node}{tag}",
            processes.labdaq_argv("engine", "--role", "node", "--node-name", node,
                                  "--speed", str(SPEED), "--database-url", self.url,
                                  "--data-dir", str(data)),
            env=self.env(), cwd=self.tmp, new_session=True)
        self.nodes[node] = proc
        return proc

    def channel(self, node: str) -> tuple[str, str]:
        ch = self.labs[node]["instruments"][0]["channels"][0]
        return ch["name"], ch["cell"]["serial"]

    def create(self, api: int, node: str, duration_s: float) -> dict[str, Any]:
        name, serial = self.channel(node)
        r = httpx.post(f"{self.apis[api]}/api/v1/runs", headers=self.auth, timeout=60,
                       json={"channel": name, "cell_serial": serial, "sample_period_s": 1.0,
                             "protocol_document": _charge(duration_s)})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    def stop(self, api: int, run_id: int) -> None:
        r = httpx.post(f"{self.apis[api]}/api/v1/runs/{run_id}/stop", headers=self.auth,
                       timeout=30)
        assert r.status_code == 200, r.text

    def run(self, api: int, run_id: int) -> dict[str, Any]:
        r = httpx.get(f"{self.apis[api]}/api/v1/runs/{run_id}", headers=self.auth, timeout=30)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def query(self, sql: str, **params: Any) -> list[Any]:
        async def go() -> list[Any]:
            engine = create_engine(self.url)
            try:
                async with engine.connect() as conn:
                    return list((await conn.execute(text(sql), params)).all())
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def wait(self, pred: Callable[[], bool], what: str, timeout_s: float = 400) -> None:
        """Until ``pred``; fails at once if a process it relies on died, with its log.
        The limit only stops a hang: two nodes, two APIs and a simulated lab share the
        machine, and on a loaded one a 60 s simulated run took more than 120 s."""
        def check() -> bool:
            for name, proc in self.children.procs:
                if proc in self.nodes.values() and proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n"
                                         f"{self.children.tail(name)}")
            return pred()

        try:
            processes.wait_until(check, timeout_s, what, poll_s=0.1)
        except processes.ChildFailed as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None

    def diagnosis(self) -> str:
        """What a wait that ran out of time needs to be understood: the database's view of
        the runs and their events, and every engine's threads and asyncio tasks
        (labdaq/stack_dump.py) with the end of its log."""
        queries = {
            "runs": "SELECT id, node, state, started_at, end_reason FROM runs ORDER BY id",
            "events": "SELECT id, run_id, kind, message FROM events ORDER BY id",
            "samples": "SELECT run_id, count(*) FROM samples GROUP BY run_id",
        }
        parts = [f"{what}: {self.query(sql)}" for what, sql in queries.items()]
        for name, proc in self.children.procs:
            if not name.startswith("node-") or proc.poll() is not None:
                continue
            # `engine` itself, or the engine child of `serve --role node`; only engines
            # take SIGUSR2 (to any other process it is fatal).
            for pid in [proc.pid, *_children(proc.pid)]:
                with contextlib.suppress(OSError):
                    if b"\0engine\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGUSR2)
            with contextlib.suppress(processes.ChildFailed):
                processes.wait_until(
                    lambda n=name: "--- end of stacks" in self.children.tail(n, 200_000),
                    30, "stacks")
            parts.append(f"== {name}\n{self.children.tail(name, 30_000)}")
        return "\n".join(parts)


async def _register(url: str, labs: dict[str, dict[str, Any]]) -> str:
    for desc in labs.values():
        await _register_sim_lab(url, desc, node=desc["node"])
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return await create_token(s, "nodes-test", "technician")
    finally:
        await engine.dispose()


@pytest.fixture
def cluster(db_url: str, tmp_path: Path, receiver: _Receiver) -> Iterator[Cluster]:
    """Node a: ``labdaq sim`` and ``labdaq engine --role node`` (the one the tests kill);
    node b: ``labdaq serve --role node --sim`` (its lab and engine supervised); two
    ``labdaq serve --role api``, alerting every kind to ``receiver``'s /ok."""
    logs = tmp_path / "logs"
    logs.mkdir()
    c = Cluster(db_url, tmp_path, processes.Children(logs),
                hook=f"http://127.0.0.1:{receiver.server_address[1]}/ok")
    try:
        path = tmp_path / "lab-a.json"
        proc = c.children.spawn(
            "lab-a", processes.sim_argv(path, "--speed", str(SPEED), "--soc", "0.2",
                                        "--watchdog", "0"),
            stdout=subprocess.DEVNULL, env=c.env(), cwd=tmp_path, new_session=True)
        c.labs["a"] = node_lab(processes.read_sim_description(path, proc), "a")
        make_idle_safe(c.labs["a"])  # until node a opens its SMU (tests/sim_idle.py)
        c.token = asyncio.run(_register(db_url, c.labs))
        for k in range(2):
            port = free_port()
            proc = c.children.spawn(
                f"api-{k}", processes.labdaq_argv(
                    "serve", "--role", "api", "--port", str(port), "--database-url", db_url,
                    "--data-dir", str(tmp_path / f"api-{k}")),
                env=c.env(), cwd=tmp_path, new_session=True)
            # One after the other: each `serve` runs the migrations first.
            processes.wait_for_http("127.0.0.1", port, "/health", SERVICE_START_S, proc)
            c.apis.append(f"http://127.0.0.1:{port}")
        data_b = tmp_path / "node-b"
        c.nodes["b"] = c.children.spawn(
            "node-b", processes.labdaq_argv(
                "serve", "--role", "node", "--node-name", "b", "--sim", "--speed", str(SPEED),
                "--sim-cabinets", "0", "--sim-impedance", "0", "--no-sim-chamber",
                "--database-url", db_url, "--data-dir", str(data_b)),
            stdout=subprocess.DEVNULL, env=c.env(), cwd=tmp_path, new_session=True)
        desc_b = processes.read_sim_description(data_b / "simlab.json", c.nodes["b"])
        c.labs["b"] = node_lab(desc_b, "b")
        c.wait(lambda: c.query("SELECT count(*) FROM instruments WHERE node = 'b'")
               == [(len(desc_b["instruments"]),)], "node b to register its lab")
        c.start_node("a")
        yield c
    finally:
        c.children.stop_all(timeout_s=20)


# The PostgreSQL variant only: several nodes need it (SQLite is refused, tested below).
pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.mark.slow
@pg_only
def test_runs_start_on_their_node_and_a_race_keeps_queue_order(cluster: Cluster) -> None:
    c = cluster
    # Through either API, each run starts on the node that drives its channel.
    run_b, run_a = c.create(0, "b", 60)["id"], c.create(1, "a", 60)["id"]
    c.wait(lambda: all(c.run(0, r)["state"] == "completed" for r in (run_a, run_b)),
           "both runs to complete")
    assert c.run(1, run_a)["node"] == "a" and c.run(0, run_b)["node"] == "b"
    for run_id in (run_a, run_b):
        ((n, lo, hi),) = c.query("SELECT count(*), min(seq), max(seq) FROM samples "
                                 "WHERE run_id = :r", r=run_id)
        assert n > 0 and (lo, hi) == (1, n)
        r = httpx.get(f"{c.apis[1]}/api/v1/runs/{run_id}/samples", headers=c.auth,
                      timeout=30)
        assert r.status_code == 200 and r.json()["seq"][:1] == [1]

    # Both APIs create runs for one busy channel at once: each gets a place of its own,
    # and once the run holding the channel is stopped (a command row, through the other
    # API) they start one at a time in the order of their places.
    # Stopped below, never completed: it must outlast the eight creations however slow a
    # busy machine makes them (if it ended first, the first raced run would start at once
    # and the next would take place 1 again). C/5 from 20 % stays short of full.
    holder = c.create(0, "a", 12_000)["id"]
    c.wait(lambda: c.run(1, holder)["state"] == "running", "the holder to start")
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda k: c.create(k % 2, "a", 30)["id"], range(8)))
    assert len(set(made)) == 8
    places = dict(c.query("SELECT id, queue_order FROM runs WHERE id = ANY(:ids)", ids=made))
    assert sorted(places.values()) == list(range(1, 9))
    c.stop(1, holder)
    c.wait(lambda: all(c.run(k % 2, r)["state"] == "completed" for k, r in enumerate(made)),
           "every raced run to complete", timeout_s=400)
    assert c.run(0, holder)["state"] == "stopped"
    rows = c.query("SELECT id, started_at, ended_at, node FROM runs "
                   "WHERE id = ANY(:ids) ORDER BY started_at", ids=made)
    assert [places[r.id] for r in rows] == list(range(1, 9))
    assert all(a.ended_at <= b.started_at for a, b in zip(rows, rows[1:], strict=False))
    assert {r.node for r in rows} == {"a"}
    assert c.query("SELECT count(*) FROM events WHERE kind = 'interruption'") == [(0,)]


@pytest.mark.slow
@pg_only
def test_kill9_node_shows_node_down_then_resumes_without_loss(
        cluster: Cluster, receiver: _Receiver) -> None:
    c = cluster

    def node_alerts() -> list[tuple[str, str, list[int]]]:
        return [(p["kind"], p["node"], p["runs"]) for p in list(receiver.posts.get("/ok", []))
                if p["kind"] in ("node_down", "node_up")]

    # Node a's run outlasts the watch noticing the node's return, however late a busy
    # machine lets the API poll: only the stop below ends it. (A run that had completed by
    # then would not be among the node's runs in the node_up event.)
    run_a = c.create(0, "a", 12_000)["id"]
    run_b = c.create(1, "b", 3000)["id"]
    c.wait(lambda: c.query("SELECT count(*) FROM samples WHERE run_id = :r",
                           r=run_a)[0][0] >= 200, "node a's run to store samples")
    node = c.nodes.pop("a")  # its death is the point: the waits no longer watch it
    writers = _children(node.pid)
    os.kill(node.pid, signal.SIGKILL)
    node.wait(10)
    c.wait(lambda: not any(_alive(w) for w in writers), "node a's writer to exit", 30)
    before = c.query("SELECT seq, t_s, voltage_v FROM samples WHERE run_id = :r "
                     "ORDER BY seq", r=run_a)
    # Both APIs see it: the run is node_down, the other node's run is running.
    c.wait(lambda: all(c.run(k, run_a)["state"] == "node_down" for k in (0, 1)),
           "the APIs to show node a's run as node_down", 60)
    assert c.run(0, run_b)["state"] == "running"
    # An API process (it survives the node) wrote the change once, and it was alerted.
    c.wait(lambda: node_alerts() == [("node_down", "a", [run_a])],
           "the node_down alert", 60)
    # Nobody else took it: it is still node a's, as its committed samples are.
    assert c.query("SELECT node, state FROM runs WHERE id = :r", r=run_a) == [("a", "running")]

    c.start_node("a", tag="-restarted")
    c.wait(lambda: c.run(1, run_a)["state"] == "running"
           and c.query("SELECT count(*) FROM events WHERE run_id = :r AND "
                       "kind = 'interruption'", r=run_a)[0][0] == 1,
           "node a to resume its run", 60)
    c.wait(lambda: len(node_alerts()) == 2, "the node_up alert", 60)
    c.stop(0, run_a)
    c.wait(lambda: c.run(0, run_a)["state"] == "stopped"
           and c.run(0, run_b)["state"] == "completed",
           "node a's run to stop and node b's to complete", 240)
    # Two API processes watched: each change is one event and one alert.
    assert node_alerts() == [("node_down", "a", [run_a]), ("node_up", "a", [run_a])]
    assert c.query("SELECT data->>'node', data->>'state' FROM events WHERE kind = 'node' "
                   "ORDER BY id") == [("a", "down"), ("a", "up")]
    ((n, lo, hi),) = c.query("SELECT count(*), min(seq), max(seq) FROM samples "
                             "WHERE run_id = :r", r=run_a)
    assert (lo, hi) == (1, n), "samples not contiguous or duplicated"
    after = c.query("SELECT seq, t_s, voltage_v FROM samples WHERE run_id = :r AND "
                    "seq <= :s ORDER BY seq", r=run_a, s=before[-1][0])
    assert after == before, "a sample committed before the kill changed or went missing"
    # Node b went on untouched: no gap, no event from node a's recovery.
    assert c.query("SELECT count(*) FROM events WHERE run_id = :r AND "
                   "kind = 'interruption'", r=run_b) == [(0,)]


@pytest.mark.slow
@pg_only
def test_live_stream_from_an_api_process_on_no_node(cluster: Cluster) -> None:
    """Node b acquires the run; API process 1 (``--role api``: no engine, no instruments)
    streams it live, every sample once and in order, from the database."""
    c = cluster
    # Long enough that only the stop below ends it: the stream is read while it runs,
    # however late a busy machine lets the niced API open it.
    run_b = c.create(0, "b", 6000)["id"]
    got: list[dict[str, Any]] = []

    def stop_once_live(out: list[dict[str, Any]]) -> bool:
        # Live: samples in a second message while the run goes on, not all at once.
        if not stopping and sum(1 for m in out if m["event"] == "samples") > 1:
            c.stop(0, run_b)
            stopping.append(run_b)
        return False

    stopping: list[int] = []
    # The stream ends with the run.
    read_stream(c.apis[1], run_b, c.token, got, until=stop_once_live)
    assert stopping and c.run(1, run_b)["state"] == "stopped"
    ((n,),) = c.query("SELECT count(*) FROM samples WHERE run_id = :r", r=run_b)
    assert n > 0 and seqs(got) == list(range(1, n + 1))
    assert [m["data"]["state"] for m in got if m["event"] == "state"][-1:] == ["stopped"]
