"""Simulated Neware BTS 8.0 API server: devices/channels with physical cells, running
Neware step XML themselves, answering the BTS TCP/XML API.

One job: be the BTS server a lab's Neware cabinets sit behind, so the ``neware_bts``
driver (and the engine's delegated mode, labdaq/engine/delegated.py) runs against a real
TCP peer.
Messages are ``<?xml ...?><bts version="1.0">...</bts>`` ended by ``\\n\\n#\\r\\n``, the
framing of Empa's aurora-neware client (``aurora_neware/neware.py``, ``NewareAPI.command``).
Request shapes follow that client; reply shapes it only parses (attributes of the
children of ``<list>``, ``<middle>`` for getdevinfo, a ``testid="..."`` anywhere in a
download reply). Attribute names of inquire/download records beyond those it reads
(``workstatus``, ``count``, ``testid``) are ours: not confirmed against a real server.

The program runs on the simulator (importing nothing from labdaq.engine or
labdaq.protocol): step types 1 CC charge, 2 CC discharge, 3 CC-CV charge, 19 CC-CV
discharge, 4 rest, 5 loop (``Start_Step``/``Cycle_Count``), 6 end — the shapes
aurora-unicycler writes (``aurora_unicycler/_formats/neware.py``) — with units 0.1 mV
(``Volt``, ``Stop_Volt``), mA (``Curr``, ``Stop_Curr``), ms (``Time``), mAs (``Cap``), and
whole-program protection from ``Whole_Prt/Protect``. Simulated time advances by
:meth:`NewareBtsSim.advance` (tests, deterministic) or a background thread at ``speed``.
Faults (:func:`apply_fault`, now or at a simulated time): dropped connections, the
server unreachable for a while, slow replies, a ``protect`` trip with a reason.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading
import time
import xml.etree.ElementTree as ET  # noqa: S405 - parses our own step files and requests
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from .cell import CellBank
from .neware_program import StepProgram, parse_step_xml

TERMINATION = b"\n\n#\r\n"
HEADER = '<?xml version="1.0" encoding="UTF-8" ?><bts version="1.0">'
FOOTER = "</bts>"
DEVTYPE = 24
IDLE_STATES = ("stop", "finish", "protect")
TICK_S = 1.0  # physics step: end conditions are checked at this resolution


@dataclass
class Test:
    test_id: int
    barcode: str
    records: list[dict[str, float | int | str]] = field(default_factory=list)
    log: list[dict[str, str | float]] = field(default_factory=list)


@dataclass
class Channel:
    devid: int
    subdevid: int
    chlid: int
    index: int  # position in the cell bank
    workstatus: str = "stop"
    reason: str = ""
    test: Test | None = None
    program: StepProgram | None = None
    step_id: int = 0
    cycle: int = 1
    loops: dict[int, int] = field(default_factory=dict)
    test_time_s: float = 0.0
    step_time_s: float = 0.0
    step_ah: float = 0.0
    total_ah: float = 0.0
    cv_phase: bool = False
    since_record_s: float = 0.0
    breach_s: float = 0.0
    current_a: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.devid}-{self.subdevid}-{self.chlid}"


class NewareBtsSim:
    """The BTS server's state: channels, their cells, programs and recorded tests."""

    def __init__(self, devices: int = 1, subdevices: int = 1, channels: int = 8, *,
                 cell: str = "nmc811", soc: float = 0.5, seed: int = 1,
                 ip: str = "127.0.0.1") -> None:
        self.ip = ip
        self.channels: dict[str, Channel] = {}
        i = 0
        for d in range(1, devices + 1):
            for s in range(1, subdevices + 1):
                for c in range(1, channels + 1):
                    ch = Channel(d, s, c, i)
                    self.channels[ch.name] = ch
                    i += 1
        self.bank = CellBank(cell, n=i, soc=soc, seed=seed)
        self.lock = threading.RLock()
        self.t_s = 0.0
        self._next_test_id = 1
        self.tests: dict[str, dict[int, Test]] = {name: {} for name in self.channels}
        self._due: list[tuple[float, Callable[[], None]]] = []  # faults on simulated time

    def at(self, t_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` once simulated time reaches ``t_s`` (scheduled faults)."""
        with self.lock:
            self._due.append((t_s, action))
            self._due.sort(key=lambda d: d[0])

    # -- time -------------------------------------------------------------------------
    def advance(self, dt_s: float) -> None:
        """Run every channel for ``dt_s`` simulated seconds in ``TICK_S`` steps."""
        with self.lock:
            remaining = float(dt_s)
            while remaining > 1e-9:
                dt = min(TICK_S, remaining)
                self._tick(dt)
                remaining -= dt
                while self._due and self._due[0][0] <= self.t_s + 1e-9:
                    self._due.pop(0)[1]()

    def _tick(self, dt: float) -> None:
        chans = list(self.channels.values())
        current = np.zeros(self.bank.n)
        for ch in chans:
            if ch.workstatus == "working" and ch.program is not None:
                current[ch.index] = self._set_point(ch, dt)
        self.bank.step(current, dt)
        self.t_s += dt
        volts = self.bank.voltage_v
        for ch in chans:
            ch.current_a = float(current[ch.index])
            if ch.workstatus != "working" or ch.program is None:
                continue
            ch.test_time_s += dt
            ch.step_time_s += dt
            ah = abs(ch.current_a) * dt / 3600.0
            ch.step_ah += ah
            ch.total_ah += ah
            ch.since_record_s += dt
            if self._protect_check(ch, float(volts[ch.index]), dt):
                continue
            ended = self._step_ended(ch, float(volts[ch.index]))
            if ended or ch.since_record_s >= ch.program.record_s - 1e-9:
                self._record(ch)
            if ended:
                self._next_step(ch, ch.step_id + 1)

    def _set_point(self, ch: Channel, dt: float) -> float:
        assert ch.program is not None
        s = ch.program.steps[ch.step_id]
        if s.step_type == 1:
            return s.current_a
        if s.step_type == 2:
            return -s.current_a
        if s.step_type in (3, 19):
            assert s.voltage_v is not None
            sign = 1.0 if s.step_type == 3 else -1.0
            cv = float(self.bank.current_to_reach_voltage(
                np.full(self.bank.n, s.voltage_v), dt)[ch.index])
            limit = s.current_a if s.current_a > 0 else 1e9
            if sign * cv < limit:
                ch.cv_phase = True
                return sign * max(sign * cv, 0.0)
            return sign * limit
        return 0.0

    def _step_ended(self, ch: Channel, volt: float) -> bool:
        assert ch.program is not None
        s = ch.program.steps[ch.step_id]
        if s.time_s is not None and ch.step_time_s >= s.time_s - 1e-9:
            return True
        if s.capacity_ah is not None and ch.step_ah >= s.capacity_ah:
            return True
        if s.step_type == 1 and s.stop_voltage_v is not None and volt >= s.stop_voltage_v:
            return True
        if s.step_type == 2 and s.stop_voltage_v is not None and volt <= s.stop_voltage_v:
            return True
        return (s.step_type in (3, 19) and ch.cv_phase and s.stop_current_a is not None
                and abs(ch.current_a) <= s.stop_current_a)

    def _protect_check(self, ch: Channel, volt: float, dt: float) -> bool:
        assert ch.program is not None
        p = ch.program
        reason = ""
        if p.volt_upper_v is not None and volt > p.volt_upper_v:
            reason = f"voltage {volt:.4f} V above upper limit {p.volt_upper_v:.4f} V"
        elif p.volt_lower_v is not None and volt < p.volt_lower_v:
            reason = f"voltage {volt:.4f} V below lower limit {p.volt_lower_v:.4f} V"
        elif p.curr_upper_a is not None and abs(ch.current_a) > p.curr_upper_a * 1.0001:
            reason = f"current {ch.current_a:.4f} A above limit {p.curr_upper_a:.4f} A"
        elif p.cap_upper_ah is not None and ch.step_ah > p.cap_upper_ah:
            reason = f"step capacity {ch.step_ah:.4f} Ah above limit {p.cap_upper_ah:.4f} Ah"
        if not reason:
            ch.breach_s = 0.0
            return False
        ch.breach_s += dt
        if ch.breach_s < p.delay_s:
            return False
        self.trip_protect(ch.name, reason)
        return True

    def _record(self, ch: Channel) -> None:
        assert ch.test is not None and ch.program is not None
        ch.since_record_s = 0.0
        s = ch.program.steps.get(ch.step_id)
        ch.test.records.append({
            "seq": len(ch.test.records) + 1, "cycle": ch.cycle, "step": ch.step_id,
            "steptype": s.step_type if s else 0,
            "testtime": round(ch.test_time_s, 3), "steptime": round(ch.step_time_s, 3),
            "volt": float(self.bank.voltage_v[ch.index]), "curr": ch.current_a,
            "temp": float(self.bank.temperature_c[ch.index]), "cap": ch.step_ah,
        })

    def _log(self, ch: Channel, event: str, reason: str = "") -> None:
        if ch.test is not None:
            ch.test.log.append({"seq": len(ch.test.log) + 1, "testtime": ch.test_time_s,
                                "event": event, "reason": reason})

    def _next_step(self, ch: Channel, step_id: int) -> None:
        assert ch.program is not None
        while True:
            s = ch.program.steps.get(step_id)
            if s is None or s.step_type == 6:
                ch.workstatus = "finish"
                ch.current_a = 0.0
                self._log(ch, "finish")
                return
            if s.step_type == 5:
                done = ch.loops.get(s.step_id, 0) + 1
                ch.cycle += 1
                if done < s.cycle_count:
                    ch.loops[s.step_id] = done
                    step_id = s.start_step
                else:
                    ch.loops[s.step_id] = 0
                    step_id += 1
                continue
            ch.step_id = step_id
            ch.step_time_s = ch.step_ah = 0.0
            ch.cv_phase = False
            return

    # -- commands ---------------------------------------------------------------------
    def start(self, name: str, barcode: str, step_file: str) -> int:
        """Start the step file at ``step_file`` (read by the server itself); test id."""
        ch = self.channels[name]
        if ch.workstatus not in IDLE_STATES:
            raise ValueError(f"channel {name} is {ch.workstatus}")
        program = parse_step_xml(Path(step_file).read_text(encoding="utf-8"))
        test = Test(self._next_test_id, barcode)
        self._next_test_id += 1
        self.tests[name][test.test_id] = test
        ch.test, ch.program = test, program
        ch.workstatus, ch.reason = "working", ""
        ch.cycle, ch.loops = 1, {}
        ch.test_time_s = ch.total_ah = ch.since_record_s = ch.breach_s = 0.0
        self._log(ch, "start")
        self._next_step(ch, min(program.steps))
        if ch.workstatus == "working":
            self._record(ch)
        return test.test_id

    def stop(self, name: str) -> None:
        ch = self.channels[name]
        if ch.workstatus in ("working", "pause"):
            ch.workstatus, ch.current_a = "stop", 0.0
            self._log(ch, "stop")

    def pause(self, name: str) -> None:
        ch = self.channels[name]
        if ch.workstatus != "working":
            raise ValueError(f"channel {name} is {ch.workstatus}")
        ch.workstatus, ch.current_a = "pause", 0.0
        self._log(ch, "pause")

    def resume(self, name: str) -> None:
        ch = self.channels[name]
        if ch.workstatus != "pause":
            raise ValueError(f"channel {name} is {ch.workstatus}")
        ch.workstatus = "working"
        self._log(ch, "continue")

    def trip_protect(self, name: str, reason: str) -> None:
        """The cycler's own protection fired: the channel stops in state ``protect``."""
        with self.lock:
            ch = self.channels[name]
            if ch.workstatus not in ("working", "pause"):
                return
            if ch.test is not None and ch.program is not None:
                self._record(ch)
            ch.workstatus, ch.reason, ch.current_a = "protect", reason, 0.0
            self._log(ch, "protect", reason)

    def start_foreign(self, name: str, step_file: str) -> int:
        """A technician started a test at the BTS client (not through labdaq)."""
        with self.lock:
            return self.start(name, "bench", step_file)


# -- the TCP/XML API ---------------------------------------------------------------------


def _addr(ch: Channel, ip: str) -> str:
    return (f'ip="{ip}" devtype="{DEVTYPE}" devid="{ch.devid}" subdevid="{ch.subdevid}" '
            f'chlid="{ch.chlid}"')


def _attrs(d: dict[str, float | int | str]) -> str:
    return " ".join(f"{k}={quoteattr(str(v))}" for k, v in d.items())


class BtsApi:
    """Parse one request, run it on the simulator, build the reply XML."""

    def __init__(self, sim: NewareBtsSim) -> None:
        self.sim = sim

    def _chan(self, el: ET.Element) -> Channel:
        name = f"{el.attrib['devid']}-{el.attrib['subdevid']}-{el.attrib['chlid']}"
        return self.sim.channels[name]

    def handle(self, text: str) -> str:
        root = ET.fromstring(text)  # noqa: S314 - a request on a lab network
        cmd = (root.findtext("cmd") or "").strip()
        with self.sim.lock:
            body = self._dispatch(cmd, root)
        return f"{HEADER}<cmd>{cmd}</cmd>{body}{FOOTER}"

    def _items(self, root: ET.Element, tag: str) -> list[ET.Element]:
        lst = root.find("list")
        return [el for el in (lst if lst is not None else []) if el.tag == tag]

    def _dispatch(self, cmd: str, root: ET.Element) -> str:  # noqa: C901 - one branch a command
        sim, ip = self.sim, self.sim.ip
        if cmd == "connect":
            return "<result>ok</result>"
        if cmd == "getdevinfo":
            rows = "".join(
                f'<channel ip="{ip}" devtype="{DEVTYPE}" devid="{c.devid}" '
                f'subdevid="{c.subdevid}" Channelid="{c.chlid}">true</channel>'
                for c in sim.channels.values())
            return f'<middle count="{len(sim.channels)}">{rows}</middle>'
        if cmd in ("getchlstatus", "inquire"):
            tag = "status" if cmd == "getchlstatus" else "inquire"
            rows = ""
            for el in self._items(root, tag):
                c = self._chan(el)
                d: dict[str, float | int | str] = {
                    "workstatus": c.workstatus, "testid": c.test.test_id if c.test else 0,
                }
                if cmd == "inquire":
                    d.update(volt=float(sim.bank.voltage_v[c.index]), curr=c.current_a,
                             temp=float(sim.bank.temperature_c[c.index]), cycle=c.cycle,
                             step=c.step_id, testtime=round(c.test_time_s, 3),
                             reason=c.reason,
                             barcode=c.test.barcode if c.test else "")
                rows += f"<{tag} {_addr(c, ip)} {_attrs(d)}>{c.workstatus}</{tag}>"
            return f'<list count="{len(self._items(root, tag))}">{rows}</list>'
        if cmd in ("start", "stop", "pause", "continue"):
            rows = ""
            items = self._items(root, cmd)
            for el in items:
                c = self._chan(el)
                extra = ""
                try:
                    if cmd == "start":
                        tid = sim.start(c.name, el.attrib.get("barcode", ""),
                                        (el.text or "").strip())
                        extra = f' testid="{tid}"'
                    elif cmd == "stop":
                        sim.stop(c.name)
                    elif cmd == "pause":
                        sim.pause(c.name)
                    else:
                        sim.resume(c.name)
                    result = "ok"
                except (ValueError, OSError, ET.ParseError, KeyError) as exc:
                    result = "false"
                    extra = f" error={quoteattr(str(exc))}"
                rows += f"<{cmd} {_addr(c, ip)}{extra}>{result}</{cmd}>"
            return f'<list count="{len(items)}">{rows}</list>'
        if cmd in ("download", "downloadlog", "inquiredf"):
            if cmd == "inquiredf":
                rows = ""
                for item in self._items(root, "chl"):
                    c = self._chan(item)
                    t = c.test
                    rows += (f'<chl devtype="{DEVTYPE}" devid="{c.devid}" '
                             f'subdevid="{c.subdevid}" chlid="{c.chlid}" '
                             f'testid="{t.test_id if t else 0}" '
                             f'count="{len(t.records) if t else 0}"/>')
                return f'<list count="{len(self._items(root, "chl"))}">{rows}</list>'
            req = root.find("download")
            if req is None:
                raise ValueError(f"{cmd} without a <download> element")
            c = self._chan(req)
            tid = int(req.attrib.get("testid", "0"))
            test = c.test if tid == 0 else sim.tests[c.name].get(tid)
            if test is None:
                return f'<list count="0" testid="{tid}"></list>'
            if cmd == "downloadlog":
                rows = "".join(f"<log {_attrs(r)}/>" for r in test.log)
                return f'<list count="{len(test.log)}" testid="{test.test_id}">{rows}</list>'
            start = max(int(req.attrib.get("startpos", "1")), 1)
            count = max(int(req.attrib.get("count", "0")), 0)
            recs = test.records[start - 1: start - 1 + count]
            rows = "".join(f"<record {_attrs(r)}/>" for r in recs)
            return f'<list count="{len(recs)}" testid="{test.test_id}">{rows}</list>'
        return f"<result>false</result><error>unknown command {cmd!r}</error>"


class _Handler(socketserver.BaseRequestHandler):
    server: BtsServer

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        if srv.down:
            sock.close()  # fault: the server is unreachable (accepted, then dropped)
            return
        with srv.conn_lock:
            srv.connections.add(sock)
        buf = b""
        try:
            while not srv.closing:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while (cut := buf.find(TERMINATION)) >= 0:
                    msg, buf = buf[:cut], buf[cut + len(TERMINATION):]
                    srv.requests.append(msg)
                    if srv.slow_reply_s > 0:
                        time.sleep(srv.slow_reply_s)
                    if srv.drop_requests > 0 and (
                            srv.drop_only is None
                            or f"<cmd>{srv.drop_only}</cmd>".encode() in msg):
                        srv.drop_requests -= 1
                        return  # the request is lost with the connection
                    try:
                        reply = srv.api.handle(msg.decode("utf-8"))
                    except (ET.ParseError, KeyError, ValueError) as exc:
                        reply = f"{HEADER}<result>false</result><error>{exc}</error>{FOOTER}"
                    try:
                        sock.sendall(reply.encode("utf-8") + TERMINATION)
                    except OSError:
                        return  # the client left (e.g. it timed out this request)
        finally:
            with srv.conn_lock:
                srv.connections.discard(sock)
            sock.close()


class BtsServer(socketserver.ThreadingTCPServer):
    """The BTS 8.0 API endpoint on TCP (port 0 = any free port)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sim: NewareBtsSim, host: str = "127.0.0.1", port: int = 0,
                 speed: float | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.sim = sim
        self.api = BtsApi(sim)
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        # the latest requests received, for byte-level tests (bounded: a lab runs for days)
        self.requests: deque[bytes] = deque(maxlen=100_000)
        self.slow_reply_s = 0.0
        self.drop_requests = 0  # fault: drop the connection instead of this many replies
        self.drop_only: str | None = None  # ... only for this command (None = any)
        self.closing = False
        self.down = False  # fault: every connection is dropped at once while set
        self.speed = speed
        self._bg_threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def start(self) -> BtsServer:
        t = threading.Thread(target=self.serve_forever, name="neware-bts", daemon=True)
        t.start()
        self._bg_threads.append(t)
        if self.speed:
            c = threading.Thread(target=self._clock, name="neware-clock", daemon=True)
            c.start()
            self._bg_threads.append(c)
        return self

    def _clock(self) -> None:
        last = time.monotonic()
        while not self.closing:
            time.sleep(0.05)
            now = time.monotonic()
            assert self.speed is not None
            self.sim.advance((now - last) * self.speed)
            last = now

    def drop_connections(self) -> None:
        """Fault: close every open client connection now."""
        with self.conn_lock:
            for sock in list(self.connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.closing = True
        self.drop_connections()
        self.shutdown()
        self.server_close()


def serve(channels: int, *, devices: int = 1, port: int = 0, speed: float = 1.0,
          cell: str = "nmc811", soc: float = 0.5, seed: int = 1) -> BtsServer:
    """A started BTS server with ``devices`` x ``channels`` simulated channels."""
    sim = NewareBtsSim(devices=devices, channels=channels, cell=cell, soc=soc, seed=seed)
    return BtsServer(sim, port=port, speed=speed).start()


def apply_fault(server: BtsServer, text: str) -> None:
    """``drop`` | ``down:<s>`` | ``slow:<s>`` | ``protect:<dev-sub-chl>[:<reason>]``, now
    or, with ``@<t_s>`` appended, at that simulated time. ``down:<s>``: unreachable for
    ``s`` simulated seconds (the channels keep running)."""
    text, sep, when = text.partition("@")
    if sep:
        at_s = float(when)
        if at_s > server.sim.t_s:
            server.sim.at(at_s, lambda: apply_fault(server, text))
            return
    kind, _, rest = text.partition(":")
    if kind == "drop":
        server.drop_connections()
    elif kind == "down":
        server.down = True
        server.drop_connections()
        server.sim.at(server.sim.t_s + float(rest or "60"), lambda: setattr(server, "down", False))
    elif kind == "slow":
        server.slow_reply_s = float(rest or "1")
    elif kind == "protect":
        name, _, reason = rest.partition(":")
        server.sim.trip_protect(name, reason or "simulated protection trip")
    else:
        raise ValueError(f"{text!r}: expected drop, down:<s>, slow:<s> or "
                         "protect:<channel>[:<reason>], optionally @<t_s>")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="simulated Neware BTS 8.0 API server")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--fault", action="append", default=[],
                   help="drop | down:<s> | slow:<s> | protect:<dev-sub-chl>[:<reason>], "
                        "each optionally @<simulated t_s>")
    args = p.parse_args(argv)
    srv = serve(args.channels, devices=args.devices, port=args.port, speed=args.speed)
    for f in args.fault:
        apply_fault(srv, f)
    host, port = srv.address
    print(f"neware1 neware_bts TCPIP::{host}::{port}::SOCKET", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
