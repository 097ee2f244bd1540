"""Command line: serve (supervisor), engine, api, sim, db, token, users, audit, evaluate,
observe, export."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from labdaq.cli_errors import wrap_commands
from labdaq.config import load_settings

app = typer.Typer(help="labdaq: data acquisition for a battery testing laboratory.")
db_app = typer.Typer(help="Database schema management.")
app.add_typer(db_app, name="db")

# `labdaq sim` and `labdaq instruments` live in their own modules.
from labdaq.cli_auth import audit_app, token_app, users_app  # noqa: E402
from labdaq.cli_evaluate import evaluate, observe  # noqa: E402
from labdaq.cli_export import export_cmd  # noqa: E402
from labdaq.cli_import import import_cmd  # noqa: E402
from labdaq.cli_instruments import instruments_app  # noqa: E402
from labdaq.cli_retention import retention_app  # noqa: E402
from labdaq.cli_sim import sim  # noqa: E402

app.command()(sim)
app.command()(evaluate)
app.command()(observe)
app.command("export")(export_cmd)
app.command("import")(import_cmd)
app.add_typer(instruments_app, name="instruments")
app.add_typer(token_app, name="token")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(retention_app, name="retention")

DataDir = Annotated[Path | None, typer.Option(help="data directory (SQLite file, journals)")]
DbUrl = Annotated[str | None, typer.Option(help="SQLAlchemy database URL")]
NodeName = Annotated[str | None, typer.Option(
    help="this acquisition node's name (default: the node_name setting, else the host "
         "name); it drives the instruments whose `node` is this name")]


def _check_role(role: str, url: str) -> None:
    """A role this database cannot have stops the start with the reason (labdaq.nodes)."""
    from labdaq.nodes import RoleError, check_role

    try:
        check_role(role, url)
    except RoleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _settings(data_dir: Path | None = None, database_url: str | None = None) -> Any:
    return load_settings(data_dir=data_dir, database_url=database_url)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Apply database migrations up to the latest revision."""
    from labdaq.storage.db import upgrade

    s = _settings(data_dir, database_url)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.resolved_database_url, samples_partitions=s.samples_partitions)
    typer.echo(f"database at head: {s.resolved_database_url}")


@db_app.command("partition-samples")
def db_partition_samples(
    partitions: Annotated[int, typer.Argument(
        min=0, max=1024, help="hash partitions of samples by run_id; 0: one plain table")],
    data_dir: DataDir = None, database_url: DbUrl = None,
) -> None:
    """PostgreSQL: move the samples table to this many hash partitions (every row moves in
    one transaction; stop the nodes first). Set samples_partitions to match."""
    from labdaq.storage import partitions as layout
    from labdaq.storage.db import create_engine

    s = _settings(data_dir, database_url)

    async def run() -> tuple[bool, int]:
        engine = create_engine(s.resolved_database_url)
        try:
            if engine.dialect.name != "postgresql":
                return False, 0
            async with engine.begin() as conn:
                changed = await conn.run_sync(layout.apply_layout, partitions)
                return changed, await conn.run_sync(layout.current_partitions)
        finally:
            await engine.dispose()

    changed, now = asyncio.run(run())
    if now != partitions:
        typer.echo("error: partitions need PostgreSQL (SQLite has one samples table)", err=True)
        raise typer.Exit(code=2)
    typer.echo(f"samples: {now} partition(s)" + ("" if changed else " (unchanged)"))


@app.command()
def engine(
    speed: Annotated[
        float, typer.Option(help="clock acceleration (match the simulated lab)")
    ] = 1.0,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    log_level: str = "INFO",
    node_name: NodeName = None,
    role: Annotated[str, typer.Option(
        help="all: the single-machine node, which also drives instruments assigned to no "
             "node; node: one of several (PostgreSQL), only its own instruments")] = "all",
) -> None:
    """Run the acquisition node (owns the instruments; its own OS process)."""
    _logging(log_level)
    from labdaq import stack_dump
    from labdaq.engine.clock import EngineClock
    from labdaq.engine.node import AcquisitionNode
    from labdaq.storage.db import create_engine

    s = _settings(data_dir, database_url)
    if role == "api":
        typer.echo("error: labdaq engine is a node: --role all or node", err=True)
        raise typer.Exit(code=2)
    _check_role(role, s.resolved_database_url)

    async def main() -> str | None:
        eng = create_engine(s.resolved_database_url)
        node = AcquisitionNode(
            eng,
            EngineClock(speed),
            poll_s=s.engine_poll_s,
            batch_rows=s.writer_batch_rows,
            batch_age_s=s.writer_batch_age_s,
            max_batch_rows=s.writer_max_batch_rows,
            commit_interval_s=s.writer_commit_interval_s,
            control_period_s=s.engine_control_period_s,
            max_resume_gap_s=s.max_resume_gap_s,
            writer_process=s.writer_process,
            temperature_stale_s=s.engine_temperature_stale_s,
            temperature_lost_s=s.engine_temperature_lost_s,
            node_name=node_name or s.node_name,
            unassigned=role == "all",
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        stack_dump.install(loop)
        try:
            await node.run_forever()
        finally:
            await eng.dispose()
        return node.failure

    failure = asyncio.run(main())
    if failure is not None:
        from labdaq.processes import EXIT_RESTART

        typer.echo(f"engine stopped: {failure}", err=True)
        raise typer.Exit(EXIT_RESTART)


@app.command("api")
def api_cmd(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    log_level: str = "info",
) -> None:
    """Run only the HTTP API (uvicorn); logs are JSON lines on stderr, one per request
    with its X-Request-ID."""
    import uvicorn

    from labdaq.api.app import create_app
    from labdaq.api.request_log import configure_json_logging

    s = _settings(data_dir, database_url)
    if s.api_nice > 0:
        # On a shared computer acquisition and its safety checks come first: under load
        # the API answers later rather than the engine sampling late.
        os.nice(s.api_nice)
    configure_json_logging(log_level)
    # uvicorn's access log is off: RequestIdMiddleware writes one record per request.
    uvicorn.run(create_app(s, gc_freeze=s.api_gc_freeze), host=host, port=port,
                log_level=log_level, log_config=None, access_log=False)


async def _register_sim_lab(url: str, desc: dict[str, Any],
                            node: str | None = None) -> tuple[str, int]:
    """Put the simulated lab's instruments, channels and cells in the database; ``node``:
    the acquisition node they belong to (None: unassigned)."""
    from sqlalchemy import select

    from labdaq.auth import DEMO_TOKEN_PREFIX, create_token, revoke_demo_tokens
    from labdaq.channels import upsert_instrument
    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    aux = sim_lab_aux(desc)
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            for inst in desc["instruments"]:
                await upsert_instrument(
                    s,
                    inst["name"],
                    inst["driver"],
                    inst["resource"],
                    [
                        {
                            **{
                                k: ch[k]
                                for k in ("index", "name", "max_current_a", "max_voltage_v")
                            },
                            "aux": aux.get(ch["cell"]["serial"]) or None,
                        }
                        for ch in inst["channels"]
                    ],
                    options=inst.get("options") or {},
                    node=node,
                )
                for ch in inst["channels"]:
                    cell = ch.get("cell")
                    if cell and not await s.scalar(
                        select(m.Cell.id).where(m.Cell.serial == cell["serial"])
                    ):
                        s.add(m.Cell(**cell))
            # One demo token at a time: each start revokes the ones earlier starts minted.
            revoked = await revoke_demo_tokens(s)
            token = await create_token(s, f"{DEMO_TOKEN_PREFIX}{int(time.time())}", "technician")
            s.add(m.Event(kind="audit", message="demo technician token created by serve --sim"))
        return token, revoked
    finally:
        await engine.dispose()


def node_lab(desc: dict[str, Any], node: str) -> dict[str, Any]:
    """A simulated lab's description as one node of several registers it: its
    instruments, channels and cells named ``<node>-<name>`` (every simulated lab has an
    smu1 and the same cell serials), and the node that drives them."""
    def cell(c: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if c is None else {**c, "serial": f"{node}-{c['serial']}"}

    prefix = f"{node}-"
    instruments = []
    for inst in desc["instruments"]:
        wiring = {k: (f"cell {prefix}{v[len('cell '):]}" if v.startswith("cell ") else v)
                  for k, v in (inst.get("wiring") or {}).items()}
        if wiring.get("contains") not in (None, "empty"):  # a chamber: "serial, serial"
            wiring["contains"] = ", ".join(prefix + x for x in wiring["contains"].split(", "))
        instruments.append({
            **inst, "name": prefix + inst["name"], "wiring": wiring,
            "channels": [{**ch, "name": prefix + ch["name"], "cell": cell(ch.get("cell"))}
                         for ch in inst["channels"]]})
    return {**desc, "instruments": instruments, "node": node}


def sim_lab_aux(desc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Which auxiliary instruments each simulated cell is wired to, by cell serial."""
    aux: dict[str, dict[str, Any]] = {}
    serials = [ch["cell"]["serial"] for inst in desc["instruments"] for ch in inst["channels"]]
    for inst in desc["instruments"]:
        wiring = inst.get("wiring") or {}
        driver = inst["driver"]
        for key, target in wiring.items():
            if driver == "espec_chamber" and key == "contains":
                for serial in serials:
                    if serial in target:
                        aux.setdefault(serial, {})["chamber"] = inst["name"]
            elif target.startswith("cell "):
                serial = target[len("cell ") :]
                if driver == "hioki_bt4560":
                    aux.setdefault(serial, {})["impedance"] = inst["name"]
                elif driver == "keysight_daq970a":
                    aux.setdefault(serial, {})["thermocouple"] = {
                        "logger": inst["name"], "channel": int(key), "type": "K"}
    return aux


def _apply_instruments_file(s: Any) -> None:
    """Load the configured instruments file before the engine opens anything; a file
    that does not apply stops the start (the lab would run on a stale configuration)."""
    from labdaq.cli_instruments import apply_file
    from labdaq.errors import LabdaqError
    from labdaq.instruments_config import InstrumentConfigError

    try:
        result = apply_file(s, s.instruments_file, actor="labdaq serve")
    except (InstrumentConfigError, LabdaqError) as exc:
        typer.echo(f"error: instruments file: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"instruments file {s.instruments_file} applied: {result.summary()}")


@app.command()
def serve(
    sim_lab: Annotated[bool, typer.Option("--sim", help="also start a simulated lab")] = False,
    speed: Annotated[float, typer.Option(help="clock acceleration for --sim")] = 1.0,
    sim_cabinets: Annotated[int, typer.Option(help="--sim: 8-channel cabinets")] = 1,
    sim_impedance: Annotated[int, typer.Option(help="--sim: impedance meters")] = 1,
    sim_chamber: Annotated[bool, typer.Option(help="--sim: a climate chamber")] = True,
    sim_fault: Annotated[list[str] | None, typer.Option(
        help="--sim: a fault for the simulated lab, as `labdaq sim --fault` takes it "
             "(repeatable)")] = None,
    sim_reply_timeout: Annotated[float | None, typer.Option(
        min=0.1, help="--sim: seconds the engine waits for a simulated instrument's reply "
                      "(default: each driver's own; a simulated lab on a loaded machine "
                      "can take longer)")] = None,
    max_restarts: Annotated[int | None, typer.Option(
        help="restarts of a child that keeps dying before giving up on it "
             "(default: the restart_max setting)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    role: Annotated[str, typer.Option(
        help="all: API, engine (and --sim lab) on this machine; node: an acquisition "
             "node of a multi-node lab (engine, and --sim lab); api: only the API. node "
             "and api need PostgreSQL (docs/deploy.md)")] = "all",
    node_name: NodeName = None,
) -> None:
    """Supervise the API, the acquisition engine and (with --sim) a simulated lab."""
    from labdaq import processes
    from labdaq.storage.db import upgrade
    from labdaq.supervisor import Child, RestartPolicy, Supervisor

    _logging()
    # A stop asked for while the children start is kept, and honoured once they run
    # (they are in sessions of their own: dying here would orphan them).
    early: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, _f: early.append(signal.Signals(n).name))
    s = _settings(data_dir, database_url)
    _check_role(role, s.resolved_database_url)
    if role == "api" and sim_lab:
        typer.echo("error: --sim starts instruments, which only a node drives: --role node "
                   "or all", err=True)
        raise typer.Exit(code=2)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    url = s.resolved_database_url
    upgrade(url, samples_partitions=s.samples_partitions)
    if s.instruments_file is not None:
        _apply_instruments_file(s)
    common = ["--data-dir", str(s.data_dir)] + (
        ["--database-url", s.database_url] if s.database_url else []
    )
    policy = RestartPolicy(
        backoff_s=s.restart_backoff_s, backoff_max_s=s.restart_backoff_max_s,
        max_restarts=s.restart_max if max_restarts is None else max_restarts,
        stable_s=s.restart_stable_s,
    )
    sup = Supervisor([], policy)
    token = desc = None
    if sim_lab:
        desc_path = s.data_dir / "simlab.json"
        desc_path.unlink(missing_ok=True)
        sim_args = ["--speed", str(speed), "--cabinets", str(sim_cabinets),
                    "--impedance", str(sim_impedance),
                    "--chamber" if sim_chamber else "--no-chamber"]
        for text in sim_fault or []:
            sim_args += ["--fault", text]
        sim = Child("sim", processes.sim_argv(desc_path, *sim_args),
                    # Restarted on the same TCP ports: the engine reconnects by itself.
                    restart_argv=processes.sim_argv(desc_path, *sim_args, ports_from=desc_path))
        sup.children.append(sim)
        sup.start(sim)
        assert sim.proc is not None
        try:
            desc = processes.read_sim_description(desc_path, sim.proc, timeout_s=30)
        except processes.ChildFailed as exc:
            asyncio.run(sup.stop_all(["sim"]))
            typer.echo(f"simulated lab did not start: {exc}", err=True)
            raise typer.Exit(1) from None
        if role == "node":
            # Several simulated nodes share the database: each lab's names its own.
            desc = node_lab(desc, node_name or s.node_name or socket.gethostname())
        if sim_reply_timeout is not None:
            for inst in desc["instruments"]:
                options = inst.setdefault("options", {})
                options["transport"] = {**options.get("transport", {}),
                                        "timeout_s": sim_reply_timeout}
        token, revoked = asyncio.run(_register_sim_lab(
            url, desc, node=desc.get("node")))
        if revoked:
            typer.echo(f"revoked {revoked} demo token(s) from earlier `serve --sim` starts")
    engine_speed = speed if sim_lab else 1.0
    if role in ("all", "node"):
        naming = ["--node-name", node_name] if node_name else []
        sup.children.append(Child(
            "engine", processes.labdaq_argv("engine", "--speed", str(engine_speed),
                                            "--role", role, *naming, *common),
            depends_on=("sim",) if sim_lab else ()))
    if role in ("all", "api"):
        sup.children.append(Child(
            "api", processes.labdaq_argv("api", "--host", host, "--port", str(port), *common)))
    for child in sup.children[1 if sim_lab else 0:]:
        sup.start(child)
    base = f"http://{host}:{port}"
    if role == "node":
        typer.echo(f"labdaq node {node_name or s.node_name or socket.gethostname()} is "
                   "starting")
    else:
        typer.echo(f"labdaq is starting: API {base}  (docs {base}/docs, health "
                   f"{base}/health, ready {base}/ready)")
    if token and desc:
        typer.echo(_demo_text(base, token, desc))
    # A node of a multi-node lab records on, and makes safe, its own runs and instruments.
    owner = None if role == "all" else (node_name or s.node_name or socket.gethostname(),
                                        False)
    asyncio.run(_supervise(sup, url, early, owner))


async def _supervise(sup: Any, url: str, received: list[str],
                     owner: tuple[str, bool] | None = None) -> None:
    """Watch the children until SIGINT/SIGTERM, then stop them in order (labdaq.supervisor).
    ``owner``: (node name, drives unassigned instruments) of a multi-node lab's node."""
    from labdaq import supervisor

    node = owner[0] if owner is not None else None

    async def record_event(message: str, severity: str = "warning",
                           data: dict[str, Any] | None = None) -> list[int]:
        return await supervisor.record_event(url, message, severity, data, node=node)

    log = logging.getLogger("labdaq.serve")

    async def on_event(ev: supervisor.ChildEvent) -> None:
        what = {"sim": "simulated lab", "engine": "engine", "api": "API"}.get(ev.child, ev.child)
        data = {"child": ev.child, "returncode": ev.returncode, "deaths_in_a_row": ev.streak,
                "pid": ev.pid}
        if ev.kind == "exited":
            await record_event(
                f"{what} process exited with {ev.returncode}; restarting it in "
                f"{ev.restart_in_s:.1f} s", data={**data, "restart_in_s": ev.restart_in_s})
        elif ev.kind == "restarted":
            await record_event(f"{what} process restarted", "info", data)
        elif ev.kind == "gave_up":
            done: dict[str, str] = {}
            if ev.child in ("engine", "sim"):
                # No engine is there to keep the cells safe: switch off what answers.
                done = await supervisor.all_outputs_off(url, owner=owner)
                log.critical("outputs turned off directly: %s", done)
            await record_event(
                f"{what} process died {ev.streak} times in a row (last exit "
                f"{ev.returncode}); not restarted. Outputs turned off through the "
                f"instruments directly: " + (", ".join(f"{k}: {v}" for k, v in done.items())
                                             or "none configured"),
                "error", {**data, "outputs_off": done})

    sup.handler = on_event
    stop = asyncio.Event()
    if received:
        stop.set()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await sup.watch(stop)
    finally:
        why = received[0] if received else "supervisor ending"
        try:
            await asyncio.wait_for(record_event(
                f"service stopping ({why}): the engine turns outputs off and saves each "
                "run's position; runs keep their state and resume on the next start",
                "info", {"signal": why}), 15)
        except Exception as exc:  # noqa: BLE001 - stopping safely matters more
            log.error("could not record the stop: %s", exc)
        # API first (no new work), then the engine (outputs off, positions saved), then
        # the simulated lab it was talking to.
        clean = await sup.stop_all(["api", "engine", "sim"])
        if clean.get("engine") is False:
            log.error("the engine did not stop in time and was killed: outputs off directly")
            log.error("outputs: %s", await supervisor.all_outputs_off(url, owner=owner))
        await sup.drain()


def _demo_text(base: str, token: str, desc: dict[str, Any]) -> str:
    ch = desc["instruments"][0]["channels"][0]
    cell = ch["cell"]
    cap = cell["capacity_ah"]
    body = {
        "channel": ch["name"],
        "cell_serial": cell["serial"],
        "protocol": {
            "charge_current_a": round(cap / 2, 4),
            "charge_voltage_v": cell["charge_cutoff_v"],
            "rest_s": 300,
            "discharge_current_a": round(cap / 2, 4),
            "discharge_cutoff_v": cell["discharge_cutoff_v"],
            "cycles": 1,
        },
        "sample_period_s": 2,
    }
    return (
        f"\nDemo technician token (shown once): {token}\n"
        f"Start a demo run (C/2 charge and discharge of {cell['serial']}, {cap} Ah):\n"
        f"  curl -s -X POST {base}/api/v1/runs -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'\n"
        f"Then watch it:  curl -s -H 'Authorization: Bearer {token}' {base}/api/v1/runs/1\n"
        f"Cycle summary:  curl -s -H 'Authorization: Bearer {token}' "
        f"{base}/api/v1/runs/1/cycles\n"
        "Press Ctrl-C to stop everything (outputs are turned off first).\n"
    )


# Last, so that every command registered above (and in the sub-apps) is covered.
wrap_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
