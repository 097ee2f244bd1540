"""labdaq/engine/wallclock.py: how far the wall clock stepped since a committed position,
so a resume's gap is the time that went by, not a clock change (the end-to-end form under
libfaketime is tests/test_wallclock_jumps.py)."""

from __future__ import annotations

import time

import pytest

from labdaq.engine import wallclock


def _stepped(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    real = time.time
    monkeypatch.setattr(wallclock.time, "time", lambda: real() + step_s)


def test_no_step_reads_zero() -> None:
    assert wallclock.step_since(wallclock.snapshot()) == 0.0


def _frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both clocks stand still: an offset is read from two clocks one after the other, and
    a thread descheduled between the two reads (a loaded machine) would add that time."""
    wall_s, boot_s = time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)
    monkeypatch.setattr(wallclock.time, "time", lambda: wall_s)
    monkeypatch.setattr(wallclock.time, "clock_gettime", lambda clock_id: boot_s)


@pytest.mark.parametrize("step_s", [3600.0, -3600.0, 2.0])
def test_a_step_since_the_snapshot_is_measured(monkeypatch: pytest.MonkeyPatch,
                                               step_s: float) -> None:
    _frozen(monkeypatch)
    snap = wallclock.snapshot()
    _stepped(monkeypatch, step_s)
    assert wallclock.step_since(snap) == pytest.approx(step_s, abs=1e-6)


def test_drift_below_a_second_is_not_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = wallclock.snapshot()
    _stepped(monkeypatch, 0.5)
    assert wallclock.step_since(snap) == 0.0


@pytest.mark.parametrize("snap", [None, {}, {"boot_id": "another boot", "offset_s": 0.0},
                                  {"boot_id": wallclock.BOOT_ID, "offset_s": "x"}, "text"])
def test_unknown_or_other_boot_reads_zero(monkeypatch: pytest.MonkeyPatch, snap: object) -> None:
    _stepped(monkeypatch, 3600.0)
    assert wallclock.step_since(snap) == 0.0


def test_the_resolver_commits_a_snapshot_with_each_position() -> None:
    from labdaq.engine.ledger import Ledger, Resolver

    pos = {"seq": 1, "t_s": 0.0, "cycle": {}}
    ledger = Ledger(positions=[{"run_id": 7, "step_index": 0, "step_count": 1,
                                "cycle_index": 1, "position": pos}])
    progress = Resolver().resolve(ledger).progress[7]
    assert progress["position"][wallclock.KEY] == {
        "boot_id": wallclock.BOOT_ID,
        "offset_s": pytest.approx(wallclock.snapshot()["offset_s"], abs=0.05)}  # type: ignore[index]


class _Rounds:
    """The scheduler's wall-clock watch alone (Scheduling._watch_wall_clock), with a wall
    clock this test sets as an offset from the monotonic clock, one round at a time."""

    def __init__(self) -> None:
        from labdaq.engine.scheduling import Scheduling

        self._watch = Scheduling._watch_wall_clock
        self.offset_s = 0.0
        self.wall_clock = lambda: time.monotonic() + self.offset_s
        self.clock_jump_threshold_s = 1.0
        self._clock_offset_s: float | None = None
        self._clock_pending_s: float | None = None
        self.active = {7: object()}
        self.events: list[object] = []
        self.recorder = self

    def event(self, ev: object) -> None:
        self.events.append(ev)

    def rounds(self, *offsets_s: float) -> list[float]:
        for offset_s in offsets_s:
            self.offset_s = offset_s
            self._watch(self)  # type: ignore[arg-type]
        return [round(e.data["jump_s"]) for e in self.events]  # type: ignore[attr-defined]


def test_a_step_held_for_two_rounds_is_one_jump_on_each_active_run() -> None:
    r = _Rounds()
    assert r.rounds(0, 0, 3600, 3600, 3600, 0, 0) == [3600, -3600]
    assert all(e.run_id == 7 and e.kind == "clock_jump" for e in r.events)  # type: ignore[attr-defined]


def test_one_bad_reading_is_not_a_jump() -> None:
    # libfaketime answers one read with the real time while another thread reads its
    # timestamp file: the first reading of the process, or one in the middle.
    assert _Rounds().rounds(0, -3600, -3600, -3600, 0, -3600, -3600) == []


def test_ntp_slewing_never_adds_up_to_a_jump() -> None:
    assert _Rounds().rounds(*(0.4 * i for i in range(20))) == []
