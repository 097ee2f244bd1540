"""The Python client for engineers: read a lab's runs, cells and data over its HTTP API.

``Client(url, token)`` wraps ``/api/v1`` with httpx. Tabular data (samples, cycles) comes
back as pyarrow Tables with the API's unit-named columns (``voltage_v``, ``t_s``);
``table.to_pandas()`` gives a DataFrame where pandas is installed. Errors are raised as
:class:`LabdaqError` carrying the RFC 9457 problem the API answered with.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import pyarrow as pa

#: The samples' columns and their Arrow types (the samples table's, widened to 64 bits).
SAMPLE_SCHEMA = pa.schema([
    ("seq", pa.int64()),
    ("t_s", pa.float64()),
    ("ts_utc", pa.float64()),
    ("step_index", pa.int64()),
    ("cycle_index", pa.int64()),
    ("voltage_v", pa.float64()),
    ("current_a", pa.float64()),
    ("temperature_c", pa.float64()),
    ("step_capacity_ah", pa.float64()),
    ("step_energy_wh", pa.float64()),
    ("flags", pa.int64()),
    ("temperature_age_s", pa.float64()),
])
#: The API's largest full-resolution page.
MAX_PAGE = 100_000


class LabdaqError(Exception):
    """An error answer from the API: the RFC 9457 problem's fields (``errors`` names each
    bad field of a 422)."""

    def __init__(self, status: int, title: str, detail: str, type: str = "about:blank",
                 instance: str = "", errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.errors = errors or []

    @classmethod
    def from_response(cls, r: httpx.Response) -> LabdaqError:
        try:
            body = json.loads(r.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Not a problem document (a proxy's page, say): keep what there is.
            return cls(r.status_code, r.reason_phrase, r.text[:500])
        return cls(
            int(body.get("status", r.status_code)), str(body.get("title", r.reason_phrase)),
            str(body.get("detail", "")), str(body.get("type", "about:blank")),
            str(body.get("instance", "")), list(body.get("errors") or []),
        )


@dataclass(frozen=True)
class Message:
    """One Server-Sent Event of a run's stream: ``event`` is ``samples``, ``step``,
    ``cycle``, ``event`` or ``state``; ``id`` resumes the stream right after it."""

    id: str | None
    event: str
    data: dict[str, Any] = field(default_factory=dict)


def _parse_sse(lines: Iterator[str]) -> Iterator[Message]:
    """Messages from an event stream's lines (the WHATWG format: fields up to a blank line;
    ``:`` comments are keep-alives)."""
    msg_id: str | None = None
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield Message(msg_id, event, json.loads("\n".join(data)))
            msg_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            msg_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


class Client:
    """A lab's API, read with a token (an engineer's reads and exports everything)::

        with Client("http://127.0.0.1:8000", token) as lab:
            table = lab.samples(run_id, points=2000)
    """

    def __init__(self, url: str | None = None, token: str | None = None,
                 timeout_s: float = 60.0) -> None:
        url = url or os.environ.get("LABDAQ_URL")
        token = token or os.environ.get("LABDAQ_TOKEN")
        if not url or not token:
            raise ValueError("give url and token (or set LABDAQ_URL and LABDAQ_TOKEN)")
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        r = self._http.get(path, params={k: v for k, v in (params or {}).items()
                                         if v is not None})
        if r.is_error:
            raise LabdaqError.from_response(r)
        return r.json()

    # Runs and cells: plain JSON objects, as the API documents them.
    def runs(self, **filters: Any) -> list[dict[str, Any]]:
        """Runs, newest first; ``filters`` are the list's query parameters (``state``, ...)."""
        return list(self._get("/api/v1/runs", filters))

    def run(self, run_id: int) -> dict[str, Any]:
        return dict(self._get(f"/api/v1/runs/{run_id}"))

    def cells(self, **filters: Any) -> list[dict[str, Any]]:
        """Cells; ``filters``: ``serial``, ``chemistry``, ``limit``, ``offset``."""
        return list(self._get("/api/v1/cells", filters))

    def cell(self, cell_id: int) -> dict[str, Any]:
        return dict(self._get(f"/api/v1/cells/{cell_id}"))

    def events(self, run_id: int) -> list[dict[str, Any]]:
        """The run's events (safety, audit, ``missed_periods``, ...), oldest first."""
        return list(self._get(f"/api/v1/runs/{run_id}/events"))

    def eis(self, run_id: int) -> list[dict[str, Any]]:
        """The run's impedance spectra, each with ``frequency_hz``, ``z_real_ohm`` and
        ``z_imag_ohm`` lists."""
        return list(self._get(f"/api/v1/runs/{run_id}/eis"))

    def cycles(self, run_id: int) -> pa.Table:
        """One row per completed cycle (capacities, energies, efficiencies)."""
        return pa.Table.from_pylist(self._get(f"/api/v1/runs/{run_id}/cycles"))

    def samples(
        self, run_id: int, points: int | None = None, *, after_seq: int | None = None,
        limit: int | None = None, t_from: float | None = None, t_to: float | None = None,
        cycle: int | None = None, step: int | None = None,
    ) -> pa.Table:
        """A run's samples as a Table with :data:`SAMPLE_SCHEMA`'s columns.

        ``points=N``: at most N stored rows chosen to keep the voltage and current curves'
        shape (the server's MinMaxLTTB), for a plot. Otherwise full resolution: with
        ``limit``, one page of that many rows after ``after_seq``; without, every row
        (after ``after_seq``), fetched page by page. ``t_from``/``t_to`` (s since the start),
        ``cycle`` and ``step`` filter either way.
        """
        path = f"/api/v1/runs/{run_id}/samples"
        where = {"t_from": t_from, "t_to": t_to, "cycle": cycle, "step": step}
        if points is not None:
            return self._table([self._get(path, {**where, "points": points})])
        pages = []
        after = after_seq or 0
        while True:
            page = self._get(path, {**where, "after_seq": after, "limit": limit or MAX_PAGE})
            pages.append(page)
            after = page["next_after_seq"]
            if limit is not None or not page["more"]:
                return self._table(pages)

    @staticmethod
    def _table(pages: list[dict[str, Any]]) -> pa.Table:
        return pa.concat_tables([
            pa.table({f.name: pa.array(p[f.name], type=f.type) for f in SAMPLE_SCHEMA},
                     schema=SAMPLE_SCHEMA)
            for p in pages
        ])

    def export(self, run_id: int, fmt: Literal["csv", "parquet", "bdf"],
               path: str | os.PathLike[str]) -> Path:
        """Download the run's export to ``path``, streamed (never whole in memory); the file
        appears only complete (written as ``<path>.part``, then renamed)."""
        dest = Path(path)
        part = dest.with_name(dest.name + ".part")
        with self._http.stream("GET", f"/api/v1/runs/{run_id}/export",
                               params={"format": fmt}) as r:
            if r.is_error:
                raise LabdaqError.from_response(r)
            with open(part, "wb") as fh:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
        part.replace(dest)
        return dest

    def follow(self, run_id: int, rate_hz: float | None = None,
               last_event_id: str | None = None, max_retries: int = 5) -> Iterator[Message]:
        """The run's live stream, message by message, until the run's final state.

        A dropped connection is reopened with ``Last-Event-ID`` set to the last message's
        id, so nothing is missed or repeated; ``max_retries`` drops in a row without a
        message in between end it with the transport's error. ``last_event_id`` starts
        right after a message seen before.
        """
        params = {"rate_hz": rate_hz} if rate_hz is not None else {}
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self._http.stream("GET", f"/api/v1/runs/{run_id}/stream", params=params,
                                       headers=headers, timeout=httpx.Timeout(
                                           self._http.timeout.connect, read=None)) as r:
                    if r.is_error:
                        raise LabdaqError.from_response(r)
                    for msg in _parse_sse(r.iter_lines()):
                        failures = 0
                        if msg.id:
                            last_event_id = msg.id
                        yield msg
                return  # the server ended the stream: the run reached its final state
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                failures += 1
                if failures > max_retries:
                    raise
                # Back off a little: a restarting server refuses connections for a while.
                time.sleep(min(0.2 * 2**failures, 5.0))
