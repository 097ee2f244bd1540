"""Driver for a Neware BTS 8.0 server's TCP/XML API: a cycler that runs its own programs.

One job: send the BTS API's XML commands over TCP and return typed results, never touching
a channel that runs a test labdaq did not start. The message format and every command
marked "confirmed" below come from Empa's aurora-neware client (PyPI ``aurora-neware``
0.2.3, ``aurora_neware/neware.py``, MIT): each message is
``<?xml version="1.0" encoding="UTF-8" ?><bts version="1.0">...</bts>`` followed by
``\\n\\n#\\r\\n``, channels are addressed ``devid-subdevid-chlid`` with the ``ip`` and
``devtype`` getdevinfo reported. aurora-neware's socket has no timeout and it has no
pause/continue; this driver uses its own link (:class:`BtsLink`, drivers/neware_link.py, on
:class:`labdaq.drivers.transport.Transport`: timeouts, reconnection with backoff,
resynchronisation after a timeout) and marks ``pause``/``continue`` as not confirmed
against a real server. Reply attribute names beyond ``workstatus``, ``count`` and
``testid`` (``volt``, ``curr``, ``temp``, ``cycle``, ``step``, ``reason``) are those of
labdaq's simulator: not confirmed against a real server.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: S405 - replies from the lab's own BTS server
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Instrument
from .errors import GarbledReply, InstrumentError
from .neware_link import BtsLink
from .neware_steps import UntranslatableStep, to_neware_xml
from .roles import ProgramRunner
from .transport import Transport

if TYPE_CHECKING:
    from labdaq.protocol import ResolvedProtocol

IDLE_STATES = frozenset({"stop", "finish", "protect"})
# aurora-neware downloads in chunks of 1000 records (NewareAPI.download).
DOWNLOAD_CHUNK = 1000
_SOCKET = re.compile(r"^TCPIP\d*::([^:]+|\[[^\]]+\])::(\d+)::SOCKET$", re.IGNORECASE)


class ForeignTest(InstrumentError):
    """The channel runs a test labdaq did not start: the driver refuses to touch it."""


class CommandRefused(InstrumentError):
    """The BTS server answered ``false`` for a channel."""


@dataclass(frozen=True)
class BtsChannel:
    """One channel as getdevinfo reports it; ``name`` is ``devid-subdevid-chlid``."""

    ip: str
    devtype: str
    devid: str
    subdevid: str
    chlid: str

    @property
    def name(self) -> str:
        return f"{self.devid}-{self.subdevid}-{self.chlid}"

    def addr(self) -> str:
        """The attributes every per-channel element carries (aurora-neware's order)."""
        return (f'ip="{self.ip}" devtype="{self.devtype}" devid="{self.devid}" '
                f'subdevid="{self.subdevid}" chlid="{self.chlid}"')

    def addr_no_ip(self) -> str:
        return (f'devtype="{self.devtype}" devid="{self.devid}" '
                f'subdevid="{self.subdevid}" chlid="{self.chlid}"')


@dataclass(frozen=True)
class ChannelReading:
    """One channel's live state from ``inquire`` (SI units, current + = charge)."""

    channel: str
    workstatus: str
    test_id: int
    voltage_v: float
    current_a: float
    temperature_c: float
    cycle: int
    step: int
    test_time_s: float
    reason: str
    barcode: str = ""  # the simulator's attribute: not confirmed against a real server


def _parse(reply: str, command: str) -> ET.Element:
    try:
        return ET.fromstring(reply)  # noqa: S314 - the lab's own server
    except ET.ParseError as exc:
        raise GarbledReply(f"unparseable XML: {exc}", command=command) from exc


def _items(root: ET.Element, list_name: str = "list") -> list[dict[str, str]]:
    lst = root.find(list_name)
    if lst is None:
        return []
    out = []
    for el in lst:
        d = dict(el.attrib)
        if el.text:
            d[el.tag] = el.text
        out.append(d)
    return out


def _numbers(record: dict[str, str]) -> dict[str, float]:
    """A download record's numeric fields (text a real server may add is left out)."""
    out = {}
    for key, value in record.items():
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


class NewareBTS(Instrument, ProgramRunner):
    """A Neware BTS 8.0 server and its channels (resource ``TCPIP::<host>::<port>::SOCKET``).

    Built by the opener like any driver: a transport it is handed that is not a
    :class:`BtsLink` (the opener's line-framed link) is closed and replaced by one to the
    same host and port. ``NewareBTS.tcp(host, port)`` builds one directly.

    ``owned_test_ids``: the test ids labdaq started (from the runs table); a channel
    running any other test is never stopped, paused, continued or started over.
    ``step_dir_remote``: where the BTS server reads step files (a path on the BTS
    computer); ``step_dir_local``: the same folder as labdaq sees it (None when labdaq
    runs on the BTS computer and the two are the same).
    """

    def __init__(self, transport: Transport, name: str | None = None, *,
                 owned_test_ids: Iterable[int] = (),
                 step_dir_remote: str = "C:\\labdaq\\steps",
                 step_dir_local: str | None = None,
                 backup_dir: str = "C:\\Neware data",
                 username: str = "admin", password: str = "neware",
                 idn: str | None = None) -> None:
        if isinstance(transport, BtsLink):
            link = transport
        else:
            m = _SOCKET.match(transport.resource.strip())
            if m is None:
                raise InstrumentError(f"{transport.resource!r}: a Neware BTS server is "
                                      "reached as TCPIP::<host>::<port>::SOCKET")
            timeout_s = transport.timeout_s
            transport.close()
            link = BtsLink(m.group(1).strip("[]"), int(m.group(2)), timeout_s=timeout_s)
        super().__init__(link, name, idn=idn)
        self.link = link
        self.owned_test_ids: set[int] = set(owned_test_ids)
        self.step_dir_remote = step_dir_remote
        self.step_dir_local = step_dir_local
        self.backup_dir = backup_dir
        self.username, self.password = username, password
        self.channel_map: dict[str, BtsChannel] = {}

    @classmethod
    def tcp(cls, host: str, port: int = 502, *, timeout_s: float = 5.0,
            **options: Any) -> NewareBTS:
        """A driver for the BTS server at ``host:port``."""
        return cls(BtsLink(host, port, timeout_s=timeout_s), **options)

    @classmethod
    def identify_resource(cls, resource: str, timeout_s: float) -> str | None:
        """The identification of a BTS server at ``resource`` (``connect`` and
        ``getdevinfo`` on a connection of its own), or None if the resource is no TCP
        socket. Used by ``labdaq instruments probe``: the server frames messages by
        ``\\n\\n#\\r\\n`` and never answers a line-framed ``*IDN?``."""
        if _SOCKET.match(resource.strip()) is None:
            return None
        drv = cls._probe(resource, timeout_s)
        try:
            return drv.idn
        finally:
            drv.close()

    @classmethod
    def _probe(cls, resource: str, timeout_s: float) -> NewareBTS:
        """A driver connected to ``resource`` on a connection of its own, asked once (no
        reconnect storm hiding a dead server); the caller closes it."""
        m = _SOCKET.match(resource.strip())
        if m is None:
            raise InstrumentError(f"{resource!r}: a Neware BTS server is reached as "
                                  "TCPIP::<host>::<port>::SOCKET")
        drv = cls(BtsLink(m.group(1).strip("[]"), int(m.group(2)), timeout_s=timeout_s,
                          reconnect_attempts=1))
        try:
            drv.connect()
        except BaseException:
            drv.close()
            raise
        return drv

    @classmethod
    def list_channels(cls, resource: str, timeout_s: float) -> list[dict[str, Any]]:
        """Every channel the BTS server at ``resource`` reports (``getdevinfo``) as
        ``[[instruments.channels]]`` entries (:meth:`channel_entries`), on a connection
        of its own: what ``labdaq instruments probe --toml`` and ``labdaq sim
        --write-config`` write into an instruments file."""
        drv = cls._probe(resource, timeout_s)
        try:
            return drv.channel_entries()
        finally:
            drv.close()

    @classmethod
    def unrunnable_step(cls, resolved: ResolvedProtocol) -> tuple[str, str] | None:
        """The first step the step-file translator refuses (drivers/neware_steps.py)."""
        try:
            to_neware_xml(resolved, sample_name="check")
        except UntranslatableStep as exc:
            return exc.path, exc.reason
        return None

    @property
    def idn(self) -> str:
        """No ``*IDN?`` on the BTS API: the server and its channel count (getdevinfo)."""
        if not self.channel_map:
            self.connect()
        return f"Neware,BTS 8.0 API,{self.link.host},{len(self.channel_map)} channels"

    # -- connection ---------------------------------------------------------------------
    def connect(self) -> dict[str, BtsChannel]:
        """``connect`` then ``getdevinfo`` (confirmed: NewareAPI.connect)."""
        body = (f"<cmd>connect</cmd><username>{self.username}</username>"
                f"<password>{self.password}</password><type>bfgs</type>")
        self.link.exchange(body, idempotent=True)
        return self.getdevinfo()

    def close(self) -> None:
        self.link.close()

    def _command(self, body: str, *, idempotent: bool = True) -> ET.Element:
        return _parse(self.link.exchange(body, idempotent=idempotent), body)

    def _chan(self, name: str) -> BtsChannel:
        try:
            return self.channel_map[name]
        except KeyError as exc:
            raise InstrumentError(f"no channel {name!r} (devid-subdevid-chlid); "
                                  f"known: {sorted(self.channel_map)}") from exc

    # -- discovery and status -------------------------------------------------------------
    def getdevinfo(self) -> dict[str, BtsChannel]:
        """Every channel of the server (confirmed: NewareAPI.getdevinfo, ``<middle>``)."""
        root = self._command("<cmd>getdevinfo</cmd>")
        chans = [BtsChannel(d["ip"], d["devtype"], d["devid"], d["subdevid"], d["Channelid"])
                 for d in _items(root, "middle")]
        if not chans:
            raise InstrumentError("no devices: check that they are working in BTS Client")
        self.channel_map = {c.name: c for c in chans}
        return self.channel_map

    def channel_entries(self) -> list[dict[str, Any]]:
        """The channels as ``[[instruments.channels]]`` entries for the instruments file:
        ``index`` is the position in getdevinfo's list (1-based), ``name`` the BTS
        channel ``devid-subdevid-chlid`` that every command addresses."""
        if not self.channel_map:
            self.getdevinfo()
        return [{"index": i, "name": name} for i, name in enumerate(self.channel_map, 1)]

    def channel_name(self, index: int) -> str:
        """The BTS channel behind a channel index of the instruments file."""
        names = list(self.channel_map) or list(self.getdevinfo())
        if not 1 <= index <= len(names):
            raise InstrumentError(f"channel index {index} not in 1..{len(names)}")
        return names[index - 1]

    def _rows(self, root: ET.Element, names: Sequence[str]) -> list[dict[str, str]]:
        """One reply row per requested channel, or GarbledReply (e.g. a ``false`` reply)."""
        rows = _items(root)
        if len(rows) != len(names):
            raise GarbledReply(f"{len(rows)} rows for {len(names)} channels: "
                               f"{ET.tostring(root, encoding='unicode')[:200]}",
                               instrument=self.link.resource)
        return rows

    def _list(self, cmd: str, tag: str, names: Sequence[str], inner: str = "true",
              *, ip: bool = True, tail: str = "") -> str:
        rows = ""
        for n in names:
            c = self._chan(n)
            attrs = c.addr() if ip else c.addr_no_ip()
            rows += (f"<{tag} {attrs}{tail} />" if inner == "" else
                     f"<{tag} {attrs}{tail}>{inner}</{tag}>")
        return f'<cmd>{cmd}</cmd><list count = "{len(names)}">{rows}</list>'

    def getchlstatus(self, names: Sequence[str]) -> dict[str, str]:
        """Work status per channel (confirmed: NewareAPI.getchlstatus)."""
        root = self._command(self._list("getchlstatus", "status", names))
        return {n: r.get("workstatus", r.get("status", ""))
                for n, r in zip(names, self._rows(root, names), strict=True)}

    def inquire(self, names: Sequence[str]) -> dict[str, ChannelReading]:
        """Live V, I, T, step, cycle and work status of many channels in one request
        (request confirmed: NewareAPI.inquire; reply attributes are the simulator's)."""
        body = self._list("inquire", "inquire", names, tail=' aux="0" barcode="1"')
        root = self._command(body)
        out = {}
        for n, r in zip(names, self._rows(root, names), strict=True):
            out[n] = ChannelReading(
                channel=n, workstatus=r.get("workstatus", ""),
                test_id=int(r.get("testid", "0") or 0),
                voltage_v=float(r.get("volt", "nan")), current_a=float(r.get("curr", "nan")),
                temperature_c=float(r.get("temp", "nan")), cycle=int(r.get("cycle", "0")),
                step=int(r.get("step", "0")), test_time_s=float(r.get("testtime", "0")),
                reason=r.get("reason", ""), barcode=r.get("barcode", ""))
        return out

    def inquiredf(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """Latest test id and record count per channel (confirmed: NewareAPI.inquiredf)."""
        body = self._list("inquiredf", "chl", names, inner="", ip=False, tail=' testid="0"')
        root = self._command(body)
        return {n: {"testid": int(r.get("testid", "0")), "count": int(r.get("count", "0"))}
                for n, r in zip(names, self._rows(root, names), strict=True)}

    # -- guarding -----------------------------------------------------------------------
    def _require_owned(self, names: Sequence[str]) -> None:
        readings = self.inquire(names)
        for n, r in readings.items():
            if r.test_id and r.test_id not in self.owned_test_ids:
                raise ForeignTest(f"channel {n} runs test {r.test_id}, which labdaq did not "
                                  "start; refusing to touch it", instrument=self.link.resource)

    def _results(self, root: ET.Element, tag: str, names: Sequence[str]) -> None:
        for n, r in zip(names, self._rows(root, names), strict=True):
            if r.get(tag) != "ok":
                raise CommandRefused(f"{tag} refused on {n}: {r.get('error', r.get(tag))}",
                                     instrument=self.link.resource)

    # -- running ------------------------------------------------------------------------
    def put_step_file(self, file_name: str, xml_text: str) -> str:
        """Write a step file where the BTS server reads it (``step_dir_local``, or
        ``step_dir_remote`` when labdaq runs on the BTS computer); its name for start()."""
        if Path(file_name).name != file_name:
            raise ValueError(f"{file_name!r}: a file name, not a path")
        folder = Path(self.step_dir_local or self.step_dir_remote)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (file_name + ".tmp")
        tmp.write_text(xml_text, encoding="utf-8")
        tmp.replace(folder / file_name)  # the server never reads half a file
        return file_name

    def remote_step_path(self, file_name: str) -> str:
        sep = "\\" if "\\" in self.step_dir_remote else "/"
        return self.step_dir_remote.rstrip("\\/") + sep + file_name

    def start(self, name: str, step_file_name: str, barcode: str) -> int:
        """Start the step file ``step_file_name`` (already in the step folder) on a channel
        and return the test id it runs, pinned (confirmed: NewareAPI.start, without its
        stray ``"`` after ``</list>``; the test id read as NewareAPI.get_testid does)."""
        c = self._chan(name)
        state = self.inquire([name])[name]
        if state.workstatus not in IDLE_STATES:
            if state.test_id not in self.owned_test_ids:
                raise ForeignTest(f"channel {name} runs test {state.test_id}, which labdaq "
                                  "did not start", instrument=self.link.resource)
            raise CommandRefused(f"channel {name} is {state.workstatus}",
                                 instrument=self.link.resource)
        body = (f'<cmd>start</cmd><list count = "1">'
                f'<start {c.addr()} barcode="{barcode}">'
                f"{self.remote_step_path(step_file_name)}</start>"
                f'<backup backupdir="{self.backup_dir}" remotedir="" filenametype="0" '
                'customfilename="" addtimewhenrepeat="0" createdirbydate="0" '
                'filetype="0" backupontime="1" backupontimeinterval="720" '
                'backupfree="1" /></list>')
        root = self._command(body, idempotent=False)
        self._results(root, "start", [name])
        test_id = self.test_id(name)
        self.owned_test_ids.add(test_id)
        return test_id

    def test_id(self, name: str) -> int:
        """The channel's latest test id: download of 0 records (NewareAPI.get_testid)."""
        c = self._chan(name)
        body = (f"<cmd>download</cmd><download {c.addr_no_ip()} "
                'auxid="0" testid="0" startpos="0" count="0"/>')
        lst = self._command(body).find("list")
        if lst is None or "testid" not in lst.attrib:
            raise GarbledReply("no testid in download reply", command=body)
        return int(lst.attrib["testid"])

    def stop(self, names: Sequence[str]) -> None:
        """Stop (confirmed: NewareAPI.stop); refused for a foreign test."""
        self._require_owned(names)
        self._results(self._command(self._list("stop", "stop", names), idempotent=True),
                      "stop", names)

    def pause(self, names: Sequence[str]) -> None:
        """Pause: NOT confirmed against a real server (aurora-neware has no pause)."""
        self._require_owned(names)
        # not repeated after a lost reply: a second pause would be refused as "false"
        self._results(self._command(self._list("pause", "pause", names), idempotent=False),
                      "pause", names)

    def resume(self, names: Sequence[str]) -> None:
        """``continue``: NOT confirmed against a real server (named in aurora-neware's list
        of remaining commands, not implemented there)."""
        self._require_owned(names)
        self._results(self._command(self._list("continue", "continue", names),
                                    idempotent=False), "continue", names)

    def download(self, name: str, test_id: int, start_seq: int,
                 count: int = DOWNLOAD_CHUNK) -> list[dict[str, float]]:
        """Records ``start_seq`` .. ``start_seq + count - 1`` (1-based) of the pinned test
        (request confirmed: NewareAPI.download, with ``testid`` set instead of 0)."""
        if test_id not in self.owned_test_ids:
            raise ForeignTest(f"test {test_id} on {name} was not started by labdaq",
                              instrument=self.link.resource)
        c = self._chan(name)
        body = (f"<cmd>download</cmd><download {c.addr_no_ip()} "
                f'auxid="0" testid="{test_id}" startpos="{start_seq}" count="{count}"/>')
        root = self._command(body)
        lst = root.find("list")
        if lst is not None and int(lst.attrib.get("testid", test_id)) != test_id:
            raise GarbledReply(f"download answered for test {lst.attrib['testid']}, "
                               f"asked {test_id}", command=body)
        return [_numbers(r) for r in _items(root)]

    def download_all(self, name: str, test_id: int, after_seq: int = 0) -> list[dict[str, float]]:
        """Every record after ``after_seq``, fetched in chunks."""
        out: list[dict[str, float]] = []
        while True:
            chunk = self.download(name, test_id, after_seq + len(out) + 1)
            out += chunk
            if len(chunk) < DOWNLOAD_CHUNK:
                return out

    def downloadlog(self, name: str, test_id: int = 0) -> list[dict[str, str]]:
        """The test's log (confirmed: NewareAPI.downloadlog, which sends testid 0)."""
        c = self._chan(name)
        body = (f"<cmd>downloadlog</cmd><download {c.addr_no_ip()} "
                f'testid="{test_id}"/>')
        return _items(self._command(body))
