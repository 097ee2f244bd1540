"""The quiet readings of a logged block in one vectorised pass: (readings x runs) arrays.

One job: for a block of logged readings (group_buffered.py), process at once the longest
run of readings, from the first, at which nothing happens for any run, and say how many
that was; the group feeds the reading after them, where something does happen, through
its per-reading :meth:`~labdaq.engine.group_buffered.GroupBuffered._reading`, then asks
again from the reading after that.

A reading is *quiet* when, for every run, it is newer than the run's last one, its
temperature is a number (no sensor is lost), no limit is outside its window (so no
debounce runs and nothing breaches), no end condition of a run under its phase's own set
point holds, it does not settle a run whose phase just changed (that reading gives a
pulse step's DCIR), and it serves at most the next storage time (no period is missed).
A group whose runs have a dV/dt end condition, an auxiliary step (or its error) or wired
temperature sensors has no quiet readings here: those stay per reading.

What the per-reading path does to a quiet reading is elementwise except for the sums
along readings, so it is done here on the whole stretch at once:

* the trapezoids between consecutive readings, and every accumulator after each reading
  as a running sum seeded with its value before the block (``ufunc.accumulate`` adds
  left to right, one reading after the other, as the per-reading ``+=`` does);
* the safety window (capacity included) and the end conditions on those values;
* the storage times each reading serves, as counts of each run's grid points below the
  reading's reach (the grid itself a running sum of periods, as ``_due`` adds them);
* the rows of every due storage time, and their fast state, as one batch.

The rows, their fast state and the run state it leaves are bit-for-bit those of the
per-reading path (tests/test_buffered_block.py compares both on the same blocks); only
the split of rows into batches differs (one here for what were several puts' parts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from labdaq.engine.group_edges import FLAG_PAUSED
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray
from labdaq.engine.sample_batch import SampleBatch

if TYPE_CHECKING:
    from labdaq.engine.group_buffered import GroupBuffered, _Pending

#: The accumulators (RunArrays names) in ledger.FAST_COLUMNS order: a reading adds to
#: each, the time of the last reading that moved charge last.
_ACC = ("step_capacity_ah", "step_energy_wh", "step_discharge_ah", "cycle_charge_ah",
        "cycle_discharge_ah", "cycle_charge_wh", "cycle_discharge_wh", "cycle_charge_v_s",
        "cycle_charge_s", "cycle_discharge_v_s", "cycle_discharge_s", "cycle_end_t_s")
_ADDED = len(_ACC) - 1
_PULSE = ("pulse.on", "pulse.rest")


def vectorisable(g: GroupBuffered) -> bool:
    """True when the group's runs can have quiet readings at all (see the module)."""
    return not (
        g.ends.present["dvdt_below"] or g.ends.any_aux or g._tc_any
        or bool(g._sensor_lost.any()) or any(r.aux_error is not None for r in g.runs)
    )


def quiet_pass(g: GroupBuffered, t_clock: FloatArray, v: FloatArray, i: FloatArray,
               temp: FloatArray, ts_utc: FloatArray, pending: _Pending) -> int:
    """Process the quiet readings at the start of ``t_clock`` (engine clock, one per
    reading) with ``v, i, temp`` (readings x runs, in run order) and ``ts_utc``; their
    rows and fast state go to ``pending``. Returns how many readings were processed."""
    st = g.state
    n_read = len(t_clock)
    if not n_read or not vectorisable(g):
        return 0
    t = t_clock[:, None] - st.t0_clock_s
    # Cheap refusals first: the first reading is old for a run that just joined.
    if not (t[0] > st.last_t_s).all():
        return 0
    with np.errstate(invalid="ignore", over="ignore"):
        quiet, acc, grew, cnt, nd_seq = _readings(g, t, v, i, temp)
    n = int(np.argmin(quiet)) if not quiet.all() else n_read
    if n:
        _commit(g, n, t, v, i, temp, ts_utc, acc, grew, cnt, nd_seq, pending)
    return n


def _readings(g: GroupBuffered, t: FloatArray, v: FloatArray, i: FloatArray,
              temp: FloatArray) -> tuple[BoolArray, FloatArray, IntArray, IntArray,
                                         FloatArray]:
    """Every reading's quietness, with what it takes to commit them: the accumulators
    ((readings + 1) x ``_ACC`` x runs: before the block, then after each reading), how
    many storage times each reading serves, how many grid points lie below each
    reading's reach and the grid (see :func:`quiet_pass`)."""
    st = g.state
    ends = g.ends
    n_read, n_runs = t.shape
    # The previous reading of each: the run's anchor, then the reading before.
    lt = np.concatenate((st.last_t_s[None], t[:-1]))
    lv = np.concatenate((st.last_voltage_v[None], v[:-1]))
    li = np.concatenate((st.last_current_a[None], i[:-1]))
    quiet = (t > lt).all(axis=1)
    if g._own_sensor:
        quiet &= ~np.isnan(temp).any(axis=1)

    # Integration, as RunArrays.integrate (the rectangle where there is no anchor gives
    # the trapezoid's value bit for bit where there is one).
    dt = np.maximum(t - lt, 0.0)
    has_prev = ~np.isnan(lv)
    i_mid = np.where(has_prev, 0.5 * (i + li), i)
    p_mid = np.where(has_prev, 0.5 * (i * v + li * lv), i * v)
    v_dt = np.where(has_prev, 0.5 * (v + lv), v) * dt
    active = ~st.paused
    if not active.all():
        i_mid = i_mid * active
        p_mid = p_mid * active
    dq = i_mid * dt / 3600.0
    de = np.abs(p_mid * dt / 3600.0)
    moved = np.empty((n_read, 4, n_runs))  # readings x quantity x runs
    moved[:, 0], moved[:, 1], moved[:, 2], moved[:, 3] = dq, de, v_dt, dt
    chg = np.where(dq[:, None] > 0.0, moved, 0.0)
    dis = np.where(dq[:, None] < 0.0, moved, 0.0)
    # One running sum for all accumulators (readings + 1 x _ACC x runs), seeded with
    # their values before the block, reading after reading along the first axis; a
    # discharge subtracted per reading is its negation added (x - y is x + -y exactly).
    acc = np.empty((n_read + 1, len(_ACC), n_runs))
    acc[0] = [getattr(st, name) for name in _ACC]
    acc[1:, 0] = np.abs(dq)
    acc[1:, 1] = de
    acc[1:, 2] = -dis[:, 0]
    acc[1:, 3] = chg[:, 0]
    acc[1:, 4] = -dis[:, 0]
    acc[1:, 5] = chg[:, 1]
    acc[1:, 6] = dis[:, 1]
    acc[1:, 7] = chg[:, 2]
    acc[1:, 8] = chg[:, 3]
    acc[1:, 9] = dis[:, 2]
    acc[1:, 10] = dis[:, 3]
    for k in range(1, n_read + 1):  # (cheaper than ufunc.accumulate on these shapes)
        acc[k, :_ADDED] += acc[k - 1, :_ADDED]
    # The cycle's end: the time of the last reading that moved charge.
    moving = dq != 0.0
    if moving.all():
        acc[1:, _ADDED] = t
    else:
        last = np.maximum.accumulate(
            np.where(moving, np.arange(1, n_read + 1)[:, None], 0), axis=0)
        acc[1:, _ADDED] = np.concatenate((st.cycle_end_t_s[None], t))[last,
                                                                      np.arange(n_runs)]
    cap = acc[1:, 0]

    # Safety: nothing outside its window (no debounce starts, nothing breaches).
    quiet &= ~g.limits.outside(slice(None), v, i, temp, cap).any(axis=1)

    # End conditions of runs under their phase's own set point.
    has = ends.present
    hit = np.zeros(t.shape, bool)
    if has["voltage_above"]:
        hit |= v >= ends.voltage_above_v
    if has["voltage_below"]:
        hit |= v <= ends.voltage_below_v
    if has["current_below"]:
        look_s = np.minimum(st.period_s, g.control_period_s)
        hit |= (np.abs(i) <= ends.current_below_a) & (t - ends.phase_t0_s > look_s * 1.5)
    if has["capacity"]:
        hit |= cap >= ends.capacity_ah
    if has["temperature_above"]:
        hit |= temp >= ends.temperature_above_c
    if has["duration"]:
        hit |= t >= ends.deadline_t_s - 1e-9
    settled = t > st.setpoint_t_s
    quiet &= ~(hit & ~st.paused & settled).any(axis=1)
    if g._dcir_before:
        # The first settled reading of a run whose phase just changed gives a pulse
        # step's DCIR (_pulse_edges): an event for a pulse phase; for any other phase
        # it only drops the pending edge (quiet_pass's caller, _commit, does).
        pulse = [k for k in _pending(g) if g.runs[k].phase_name in _PULSE]
        if pulse:
            quiet &= ~settled[:, pulse].any(axis=1)

    # Storage: the grid of each run's next storage times (a running sum of its period,
    # as _due adds it), and how many of them lie below each reading's reach. Reading j
    # serves a storage time when that count grows; by two or more, a period was missed.
    reach = t + 0.5 * g.log_period_s
    nd_seq = np.empty((n_read + 1, n_runs))
    nd_seq[0] = st.next_due_t_s
    nd_seq[1:] = st.period_s
    np.add.accumulate(nd_seq, axis=0, out=nd_seq)
    cnt = (nd_seq[None, :, :] < reach[:, None, :]).sum(axis=1)
    grew = cnt.copy()
    grew[1:] -= cnt[:-1]
    quiet &= (grew <= 1).all(axis=1)
    return quiet, acc, grew, cnt, nd_seq


def _commit(g: GroupBuffered, n: int, t: FloatArray, v: FloatArray, i: FloatArray,
            temp: FloatArray, ts_utc: FloatArray, acc: FloatArray, grew: IntArray,
            cnt: IntArray, nd_seq: FloatArray, pending: _Pending) -> None:
    """The first ``n`` (quiet) readings' rows, fast state and run state."""
    st = g.state
    n_runs = t.shape[1]
    due = grew[:n] == 1
    jj, kk = np.nonzero(due)  # reading by reading, runs in order: the per-reading order
    if jj.size:
        seq = st.seq[kk] + np.cumsum(due, axis=0)[jj, kk]
        t_rows = t[jj, kk]
        after = acc[jj + 1, :, kk]  # each row's accumulators after its reading
        flags = np.where(st.paused[kk], FLAG_PAUSED, 0).astype(np.int64)
        ts = float(ts_utc[jj[0]]) if jj[0] == jj[-1] else ts_utc[jj]
        rows = SampleBatch(
            st.run_id[kk], seq, t_rows, ts, st.step_index[kk], st.cycle_index[kk],
            v[jj, kk], i[jj, kk], temp[jj, kk], after[:, 0], after[:, 1], flags,
            np.full(jj.size, np.nan))
        fast = np.empty((jj.size, 3 + len(_ACC)))
        fast[:, 0] = st.run_id[kk]
        fast[:, 1] = seq
        fast[:, 2] = t_rows
        fast[:, 3:] = after
        pending.add(rows, fast, None)
        st.seq = st.seq + due.sum(axis=0)
        # Each run's time is its last stored row's (the latest reading due for it).
        last_due = n - 1 - np.argmax(due[::-1], axis=0)
        st.t_s = np.where(due.any(axis=0), t[last_due, np.arange(n_runs)], st.t_s)
    for k, name in enumerate(_ACC):
        setattr(st, name, acc[n, k].copy())
    st.next_due_t_s = nd_seq[cnt[n - 1], np.arange(n_runs)]
    # Every reading was inside the window: no debounce is running.
    st.breach_since_t_s = np.full(n_runs, np.nan)
    st.last_t_s = t[n - 1].copy()
    st.last_voltage_v = v[n - 1].copy()
    st.last_current_a = i[n - 1].copy()
    st.last_temperature_c = temp[n - 1].copy()
    if g._dcir_before:
        # A non-pulse phase's pending edge goes at its first settled reading.
        present = set(st.run_id.tolist())
        for rid in [rid for rid in g._dcir_before if rid not in present]:
            del g._dcir_before[rid]  # as _pulse_edges: the run left another way
        for k in _pending(g):
            if (t[:n, k] > st.setpoint_t_s[k]).any():
                del g._dcir_before[int(st.run_id[k])]


def _pending(g: GroupBuffered) -> list[int]:
    """The runs (indices) whose phase just changed, waiting for their first settled
    reading (a handful at most: np.isin costs more)."""
    ks = []
    for rid in g._dcir_before:
        at = np.flatnonzero(g.state.run_id == rid)
        if at.size:
            ks.append(int(at[0]))
    return ks
