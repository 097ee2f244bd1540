"""`labdaq instruments ...`: probe a resource, check an instruments file, list drivers.

Every failure a user can cause (malformed resource, nothing answering, an answer no driver
claims, a bad configuration file) ends with exit code 2 and one line on stderr naming the
resource or instrument, the command and what was expected — never a traceback, never a
hang: the probe runs under a hard deadline because a wedged VISA read must not block the
terminal (pyvisa-py has had socket reads ignore their timeout).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

instruments_app = typer.Typer(
    help="Instruments: probe a resource, check an instruments file, list drivers.",
    no_args_is_help=True,
)

EXIT_BAD_INPUT = 2


class ProbeError(Exception):
    """A probe failure, already worded for the user."""


@dataclass
class ProbeResult:
    resource: str
    idn: str
    driver: str
    identified_by: str = "*IDN?"
    replies: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"resource": self.resource, "idn": self.idn, "driver": self.driver,
                "identified_by": self.identified_by}


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {_one_line(message)}", err=True)
    return typer.Exit(code=EXIT_BAD_INPUT)


def _unescape(text: str) -> str:
    """``\\r\\n`` typed on a command line -> CR LF."""
    return text.encode("latin-1").decode("unicode_escape")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_resource(resource: str, timeout_s: float = 2.0, *, termination: str = "\n",
                   ) -> ProbeResult:
    """Open ``resource``, ask ``*IDN?`` and find the driver; ProbeError says what failed.

    Identification is the opener's (drivers/opener.py ``identify``): instruments without
    ``*IDN?`` (ESPEC chambers answer ``NA:CMD ERR``) are identified by the queries their
    drivers declare in ``identify_queries``; a resource that stays silent is asked in the
    protocols of drivers that declare ``identify_resource`` (a Neware BTS server).
    """
    from labdaq.drivers.errors import (
        ConnectionFailed,
        GarbledReply,
        InstrumentError,
        InstrumentTimeout,
    )
    from labdaq.drivers.opener import available_drivers, identify, identify_by_own_protocol
    from labdaq.drivers.transport import open_transport
    from labdaq.instruments_config import ResourceError, parse_resource

    try:
        parse_resource(resource)
    except ResourceError as exc:
        raise ProbeError(f"resource {resource!r}: {exc}") from None
    opts: dict[str, Any] = {
        "timeout_s": timeout_s, "read_termination": termination,
        "write_termination": termination,
        # A probe asks once: no reconnect storm, no retried query hiding a dead line.
        "reconnect_attempts": 1, "retry_timeouts": False,
    }
    try:
        transport = open_transport(resource, **opts)
    except ConnectionFailed as exc:
        raise ProbeError(f"resource {resource!r}: cannot open it ({exc.detail}); expected "
                         "an instrument accepting a connection there") from None
    except InstrumentError as exc:
        raise ProbeError(f"resource {resource!r}: cannot open it ({exc})") from None
    try:
        try:
            found = identify(transport)
        except (InstrumentTimeout, ConnectionFailed) as exc:
            # Silence (or a hang-up) is also how a server with its own message framing
            # answers a line-framed *IDN? (a Neware BTS API): ask in its protocol.
            transport.close()
            own = identify_by_own_protocol(resource, timeout_s)
            if own is not None:
                return ProbeResult(resource, own.idn, str(own.driver),
                                   identified_by=own.identified_by)
            if isinstance(exc, ConnectionFailed):
                raise ProbeError(
                    f"resource {resource!r}: command '*IDN?' failed, connection lost "
                    f"({exc.detail}); expected an identification line") from None
            raise ProbeError(
                f"resource {resource!r}: command '*IDN?' got no reply within {timeout_s:g} s; "
                "expected an identification line (maker,model,serial,firmware)") from None
        except GarbledReply as exc:
            raise ProbeError(
                f"resource {resource!r}: command '*IDN?' got an unreadable reply "
                f"{exc.reply!r}; expected an identification line "
                "(maker,model,serial,firmware)") from None
        except InstrumentError as exc:
            raise ProbeError(f"resource {resource!r}: command '*IDN?' failed: {exc}") from None
        if found.driver is not None:
            return ProbeResult(resource, found.idn, found.driver,
                               identified_by=found.identified_by, replies=found.replies)
        idn = found.idn
        drivers = available_drivers()
        known = ", ".join(
            f"{n} ({' | '.join(c.idn_patterns) or '-'})" for n, c in sorted(drivers.items()))
        raise ProbeError(
            f"resource {resource!r}: command '*IDN?' answered {_short(idn)!r}, which matches "
            f"no driver; expected an identification matching one of: {known}")
    finally:
        transport.close()


def _quiet_logging() -> None:
    """Transport retries log warnings; the command's own one-line error says it all."""
    # A handler on "labdaq" stops logging's last-resort printer; configured logging (a
    # root handler) still sees the records.
    logger = logging.getLogger("labdaq")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def _run_with_deadline(fn: Any, deadline_s: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; a hard stop if it outlives ``deadline_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="labdaq-probe", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        typer.echo(f"error: {what}: no answer within the {deadline_s:g} s deadline; expected "
                   "the transport to give up by itself (stuck driver or network stack)",
                   err=True)
        sys.stderr.flush()
        sys.stdout.flush()
        # The stuck thread holds the VISA session; interpreter shutdown would wait on it.
        os._exit(EXIT_BAD_INPUT)
    if "error" in box:
        raise box["error"]
    return box.get("result")


@instruments_app.command("probe")
def probe(
    resource: Annotated[str, typer.Argument(help="VISA resource string or serial port")],
    timeout: Annotated[float, typer.Option("--timeout", help="reply timeout, seconds")] = 2.0,
    termination: Annotated[
        str, typer.Option(help=r"line termination, e.g. '\n' or '\r\n'")] = r"\n",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    toml_name: Annotated[str | None, typer.Option(
        "--toml", metavar="NAME",
        help="print an [[instruments]] table named NAME for the instruments file instead, "
             "with every channel the instrument reports (a Neware BTS server's "
             "getdevinfo)")] = None,
) -> None:
    """Open RESOURCE, send *IDN? and print the identification and the matching driver."""
    _quiet_logging()
    if not 0 < timeout <= 600:
        raise _fail(f"--timeout {timeout:g}: expected a number of seconds in (0, 600]")
    try:
        term = _unescape(termination)
    except (UnicodeDecodeError, UnicodeEncodeError):
        term = ""
    if not term:
        raise _fail(f"--termination {termination!r}: expected e.g. '\\n' or '\\r\\n'")
    try:
        result = _run_with_deadline(
            lambda: probe_resource(resource, timeout, termination=term),
            deadline_s=4 * timeout + 10.0, what=f"resource {resource!r}")
    except ProbeError as exc:
        raise _fail(str(exc)) from None
    if toml_name is not None:
        typer.echo(_probed_table(result, toml_name, timeout), nl=False)
        return
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(f"resource  {result.resource}")
    typer.echo(f"idn       {result.idn}" + (
        f"   (via {result.identified_by})" if result.identified_by != "*IDN?" else ""))
    typer.echo(f"driver    {result.driver}")


def _probed_table(result: ProbeResult, name: str, timeout_s: float) -> str:
    """The probed instrument as TOML, its channels listed as it reports them."""
    from labdaq.drivers.errors import InstrumentError
    from labdaq.instruments_config import NAME_PATTERN
    from labdaq.instruments_discovery import instrument_table
    from labdaq.instruments_toml import dump_instruments_toml

    if not re.fullmatch(NAME_PATTERN, name):
        raise _fail(f"--toml {name!r}: expected an instrument name like neware1 "
                    "(letters, digits, '_', '.', '-')")
    try:
        table = _run_with_deadline(
            lambda: instrument_table(name, result.driver, result.resource,
                                     timeout_s=timeout_s, description=result.idn),
            deadline_s=4 * timeout_s + 10.0, what=f"resource {result.resource!r}")
    except (InstrumentError, ProbeError) as exc:
        raise _fail(f"resource {result.resource!r}: listing its channels failed: "
                    f"{exc}") from None
    return dump_instruments_toml([table], header=f"probed {result.resource}")


@instruments_app.command("check")
def check(
    config: Annotated[Path, typer.Argument(help="instruments file (.toml, .yaml, .json)")],
    probe_all: Annotated[bool, typer.Option(
        "--probe", help="also open every enabled instrument and compare its driver")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="probe timeout, seconds")] = 2.0,
) -> None:
    """Validate an instruments configuration file (and optionally probe each entry)."""
    from labdaq.instruments_config import InstrumentConfigError, load_instruments_config

    _quiet_logging()
    try:
        cfg = load_instruments_config(config)
    except InstrumentConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
    if not cfg.instruments:
        raise _fail(f"{config}: no instruments; expected at least one [[instruments]] table")
    failures = 0
    for inst in cfg.instruments:
        state = "" if inst.enabled else "  (disabled)"
        typer.echo(f"{inst.name:<14} {inst.driver:<16} {inst.resource}  "
                   f"channels={len(inst.channels)}{state}")
        if not (probe_all and inst.enabled):
            continue
        term = _write_termination(inst)
        try:
            result = _run_with_deadline(
                lambda inst=inst, term=term: probe_resource(inst.resource, timeout,
                                                            termination=term),
                deadline_s=4 * timeout + 10.0, what=f"instrument {inst.name!r}")
        except ProbeError as exc:
            failures += 1
            typer.echo(f"error: instrument {inst.name!r}: {_one_line(str(exc))}", err=True)
            continue
        if result.driver != inst.driver:
            failures += 1
            typer.echo(f"error: instrument {inst.name!r}: resource {inst.resource!r} "
                       f"identifies as driver {result.driver!r} ({result.idn!r}); expected "
                       f"driver {inst.driver!r} as configured", err=True)
        else:
            typer.echo(f"{'':<14} ok: {result.idn}")
    if failures:
        raise typer.Exit(code=EXIT_BAD_INPUT)
    typer.echo(f"{config}: {len(cfg.instruments)} instrument(s), configuration is valid")


def _write_termination(inst: Any) -> str:
    """The line ending to probe a configured instrument with: what the opener would use
    (the driver's declared framing, then the file's ``options.transport``), else LF."""
    from labdaq.drivers.opener import resolve_driver, transport_options_for

    opts = transport_options_for(resolve_driver(inst.driver), inst.transport_options)
    value = opts.get("write_termination")
    return value if isinstance(value, str) and value else "\n"


@instruments_app.command("drivers")
def drivers() -> None:
    """List installed drivers (registered and ``labdaq.drivers`` entry points)."""
    from labdaq.drivers.base import load_entry_point_drivers

    for name, cls in sorted(load_entry_point_drivers().items()):
        patterns = " | ".join(cls.idn_patterns) or "-"
        extra = getattr(cls, "identify_queries", None)
        if extra:
            patterns += "  (or " + ", ".join(f"{q} ~ {p}" for q, p in extra) + ")"
        typer.echo(f"{name:<18} {cls.__module__}.{cls.__qualname__}  idn: {patterns}")


@instruments_app.command("apply")
def apply(
    config: Annotated[Path, typer.Argument(help="instruments file (.toml, .yaml, .json)")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="show what would change; change nothing")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        help="data directory (SQLite file, journals)")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy database URL")] = None,
) -> None:
    """Load an instruments file into the database: instruments, channels, wiring, cells.

    The database is made to match the file in one transaction (see docs/lab-setup.md);
    the acquisition engine opens the instruments as configured when it next starts.
    """
    from labdaq.config import load_settings
    from labdaq.errors import LabdaqError
    from labdaq.instruments_config import InstrumentConfigError

    _quiet_logging()
    settings = load_settings(data_dir=data_dir, database_url=database_url)
    try:
        result = apply_file(settings, config, dry_run=dry_run, actor="labdaq instruments apply")
    except InstrumentConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
    except LabdaqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
    for change in result.changes:
        typer.echo(change.line())
    verb = "would change" if dry_run else "applied"
    typer.echo(f"{config}: {verb}: {result.summary()}")


def apply_file(settings: Any, path: Path, *, dry_run: bool = False,
               actor: str = "labdaq") -> Any:
    """Validate ``path`` and apply it to the configured database (migrated first)."""
    import asyncio

    from labdaq.instruments_apply import apply_instruments
    from labdaq.instruments_config import read_instruments_file
    from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade

    loaded = read_instruments_file(path)
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)

    async def run() -> Any:
        engine = create_engine(url)
        try:
            async with session_scope(sessionmaker(engine)) as session:
                return await apply_instruments(session, loaded, actor=actor, dry_run=dry_run)
        finally:
            await engine.dispose()

    return asyncio.run(run())
