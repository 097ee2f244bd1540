"""Read what an evaluation needs about one run from the database into a
:class:`~labdaq.benchmarks.evaluate.RunData`: the resolved plan (protocol name, cell
limits, step tags), the samples, the step records and the impedance spectra. Sync; an
async caller uses ``await session.run_sync(lambda s: load_run_data(s, run_id))``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labdaq.analysis.load import read_samples
from labdaq.benchmarks.evaluate import ChannelAccuracy, RunData, StepData
from labdaq.benchmarks.store import observations_of
from labdaq.calibrations import ACCURACY_KEYS, status_of_run
from labdaq.imports.template import run_template
from labdaq.protocol import ResolvedProtocol
from labdaq.storage import models as m

__all__ = ["load_run_data"]


def load_run_data(session: Session, run_id: int, **options: Any) -> RunData:
    """``options`` are RunData's evaluation inputs (observations, rated, accuracy,
    calibrated, spec_cycles); the observations stored for the run (``observations``
    table) are used, and ``observations=`` given here override them per metric. The
    calibration status comes from the calibration records; a certificate in force that
    states all three accuracies gives the channel accuracy when ``accuracy`` is not given."""
    run = session.get(m.Run, run_id)
    if run is None:
        raise KeyError(f"no run {run_id}")
    plan = ResolvedProtocol.model_validate(run.plan)
    tags = {p.index: p.tag for p in plan.program}
    steps = [
        StepData(step_index=st.step_index, kind=st.kind, start_t_s=st.start_t_s,
                 end_t_s=st.end_t_s, end_reason=st.end_reason, capacity_ah=st.capacity_ah,
                 tag=tags.get(st.step_index))
        for st in session.scalars(
            select(m.Step).where(m.Step.run_id == run_id).order_by(m.Step.step_number))
    ]
    spectra = [
        {"frequency_hz": sp.frequency_hz, "z_real_ohm": sp.z_real_ohm,
         "z_imag_ohm": sp.z_imag_ohm, "t_s": sp.t_s, "step_index": sp.step_index,
         "tag": tags.get(sp.step_index)}
        for sp in session.scalars(
            select(m.EisSpectrum).where(m.EisSpectrum.run_id == run_id)
            .order_by(m.EisSpectrum.id))
    ]
    samples = read_samples(session, run_id)
    cell = session.get(m.Cell, run.cell_id)
    channel = session.get(m.Channel, run.channel_id)
    instrument = session.get(m.Instrument, channel.instrument_id) if channel else None
    meta = {
        "run": {"id": run.id, "state": run.state, "end_reason": run.end_reason,
                "started_at": run.started_at, "ended_at": run.ended_at,
                "sample_period_s": run.sample_period_s},
        "protocol": {"name": plan.name, "hash": plan.protocol_hash},
        "cell": None if cell is None else {
            "serial": cell.serial, "chemistry": cell.chemistry, "spec": cell.spec_name,
            "capacity_ah": cell.capacity_ah, "charge_cutoff_v": cell.charge_cutoff_v,
            "discharge_cutoff_v": cell.discharge_cutoff_v},
        "channel": None if channel is None else channel.name,
        "instrument": None if instrument is None else {
            "name": instrument.name, "driver": instrument.driver,
            "resource": instrument.resource, "idn": instrument.idn},
    }
    how = run_template(session, run)
    meta["protocol"] = {"name": plan.name, "hash": plan.protocol_hash,
                        "template": how.protocol, "imported": how.imported, "note": how.note}
    for key, value in how.as_options().items():
        options.setdefault(key, value)
    options.setdefault("meta", meta)
    calib = status_of_run(session, run)
    options.setdefault("calibration", calib.text)
    options.setdefault("calibrated", calib.status == "calibrated")
    acc = calib.accuracy or {}
    if options.get("accuracy") is None and all(k in acc for k in ACCURACY_KEYS):
        options["accuracy"] = ChannelAccuracy(
            acc["voltage_rel"], acc["current_rel"], acc["temperature_c"])
    options["observations"] = {**observations_of(session, run_id),
                               **(options.get("observations") or {})}
    return RunData(run_id=run_id, plan=plan, samples=samples, steps=steps, spectra=spectra,
                   **options)
