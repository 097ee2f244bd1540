"""Command line: serve (supervisor), engine, api, sim, db, token, users, audit, evaluate,
observe, export."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
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
from labdaq.cli_instruments import instruments_app  # noqa: E402
from labdaq.cli_sim import sim  # noqa: E402

app.command()(sim)
app.command()(evaluate)
app.command()(observe)
app.command("export")(export_cmd)
app.add_typer(instruments_app, name="instruments")
app.add_typer(token_app, name="token")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")

DataDir = Annotated[Path | None, typer.Option(help="data directory (SQLite file, journals)")]
DbUrl = Annotated[str | None, typer.Option(help="SQLAlchemy database URL")]


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
    upgrade(s.resolved_database_url)
    typer.echo(f"database at head: {s.resolved_database_url}")


@app.command()
def engine(
    speed: Annotated[
        float, typer.Option(help="clock acceleration (match the simulated lab)")
    ] = 1.0,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    log_level: str = "INFO",
) -> None:
    """Run the acquisition node (owns the instruments; its own OS process)."""
    _logging(log_level)
    from labdaq.engine.clock import EngineClock
    from labdaq.engine.node import AcquisitionNode
    from labdaq.storage.db import create_engine

    s = _settings(data_dir, database_url)

    async def main() -> str | None:
        eng = create_engine(s.resolved_database_url)
        node = AcquisitionNode(
            eng,
            EngineClock(speed),
            poll_s=s.engine_poll_s,
            batch_rows=s.writer_batch_rows,
            batch_age_s=s.writer_batch_age_s,
            max_batch_rows=s.writer_max_batch_rows,
            control_period_s=s.engine_control_period_s,
            max_resume_gap_s=s.max_resume_gap_s,
            writer_process=s.writer_process,
            temperature_stale_s=s.engine_temperature_stale_s,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
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
    uvicorn.run(create_app(s), host=host, port=port, log_level=log_level, log_config=None,
                access_log=False)


async def _register_sim_lab(url: str, desc: dict[str, Any]) -> tuple[str, int]:
    """Put the simulated lab's instruments, channels and cells in the database."""
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
    max_restarts: Annotated[int | None, typer.Option(
        help="restarts of a child that keeps dying before giving up on it "
             "(default: the restart_max setting)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
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
    s.data_dir.mkdir(parents=True, exist_ok=True)
    url = s.resolved_database_url
    upgrade(url)
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
        token, revoked = asyncio.run(_register_sim_lab(url, desc))
        if revoked:
            typer.echo(f"revoked {revoked} demo token(s) from earlier `serve --sim` starts")
    engine_speed = speed if sim_lab else 1.0
    sup.children.append(Child(
        "engine", processes.labdaq_argv("engine", "--speed", str(engine_speed), *common),
        depends_on=("sim",) if sim_lab else ()))
    sup.children.append(Child(
        "api", processes.labdaq_argv("api", "--host", host, "--port", str(port), *common)))
    for child in sup.children[1 if sim_lab else 0:]:
        sup.start(child)
    base = f"http://{host}:{port}"
    typer.echo(f"labdaq is starting: API {base}  (docs {base}/docs, health {base}/health, "
               f"ready {base}/ready)")
    if token and desc:
        typer.echo(_demo_text(base, token, desc))
    asyncio.run(_supervise(sup, url, early))


async def _supervise(sup: Any, url: str, received: list[str]) -> None:
    """Watch the children until SIGINT/SIGTERM, then stop them in order (labdaq.supervisor)."""
    from labdaq import supervisor

    log = logging.getLogger("labdaq.serve")

    async def on_event(ev: supervisor.ChildEvent) -> None:
        what = {"sim": "simulated lab", "engine": "engine", "api": "API"}.get(ev.child, ev.child)
        data = {"child": ev.child, "returncode": ev.returncode, "deaths_in_a_row": ev.streak,
                "pid": ev.pid}
        if ev.kind == "exited":
            await supervisor.record_event(
                url, f"{what} process exited with {ev.returncode}; restarting it in "
                f"{ev.restart_in_s:.1f} s", data={**data, "restart_in_s": ev.restart_in_s})
        elif ev.kind == "restarted":
            await supervisor.record_event(url, f"{what} process restarted", "info", data)
        elif ev.kind == "gave_up":
            done: dict[str, str] = {}
            if ev.child in ("engine", "sim"):
                # No engine is there to keep the cells safe: switch off what answers.
                done = await supervisor.all_outputs_off(url)
                log.critical("outputs turned off directly: %s", done)
            await supervisor.record_event(
                url, f"{what} process died {ev.streak} times in a row (last exit "
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
            await asyncio.wait_for(supervisor.record_event(
                url, f"service stopping ({why}): the engine turns outputs off and saves each "
                "run's position; runs keep their state and resume on the next start",
                "info", {"signal": why}), 15)
        except Exception as exc:  # noqa: BLE001 - stopping safely matters more
            log.error("could not record the stop: %s", exc)
        # API first (no new work), then the engine (outputs off, positions saved), then
        # the simulated lab it was talking to.
        clean = await sup.stop_all(["api", "engine", "sim"])
        if clean.get("engine") is False:
            log.error("the engine did not stop in time and was killed: outputs off directly")
            log.error("outputs: %s", await supervisor.all_outputs_off(url))
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
