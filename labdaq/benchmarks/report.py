"""HTML test report of one run: identity (cell, protocol, instrument, calibration), plots
(voltage, current and temperature against time; capacity and efficiency per cycle; dQ/dV;
Nyquist with the equivalent-circuit fit), the verdict table with the clause in every
jurisdiction's designation, the software version and hashes of the data and catalogue it
was computed from.

One self-contained file: the plots are matplotlib PNGs embedded as data URIs, no
scripts, no external assets (lab networks are often closed, and a report must still open
in ten years). The plots are drawn from at most ``MAX_POINTS`` samples per curve (every
k-th sample; the verdicts use every sample).
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from typing import Any

import numpy as np

from labdaq.analysis import fit_spectrum, incremental_capacity
from labdaq.analysis.eis import circuit_impedance
from labdaq.benchmarks.evaluate import EntryResult, RunData, RunView
from labdaq.benchmarks.store import _version, catalogue_sha256, data_sha256

__all__ = ["render_report", "MAX_POINTS"]

MAX_POINTS = 20_000


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(run: RunData, ctx: RunView) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[tuple[str, str]] = []
    s = run.samples
    n = s["t_s"].size
    if n:
        k = max(1, n // MAX_POINTS)
        t_h = s["t_s"][::k] / 3600.0
        fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
        axes[0].plot(t_h, s["voltage_v"][::k], lw=0.8)
        axes[0].set_ylabel("voltage / V")
        axes[1].plot(t_h, s["current_a"][::k], lw=0.8, color="tab:orange")
        axes[1].set_ylabel("current / A")
        temp = s.get("temperature_c")
        if temp is not None and np.isfinite(temp).any():
            axes[2].plot(t_h, temp[::k], lw=0.8, color="tab:red")
        axes[2].set_ylabel("temperature / °C")
        axes[2].set_xlabel("test time / h")
        out.append(("Voltage, current and temperature", _png(fig)))

        cy = ctx.cycles
        if len(cy):
            fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
            a1.plot(cy.cycle_index, cy.charge_capacity_ah, "o-", label="charge")
            a1.plot(cy.cycle_index, cy.discharge_capacity_ah, "s-", label="discharge")
            a1.set_ylabel("capacity / Ah")
            a1.legend()
            ok = cy.efficiency_valid
            a2.plot(cy.cycle_index[ok], cy.coulombic_efficiency[ok], "o", label="coulombic")
            a2.plot(cy.cycle_index[ok], cy.energy_efficiency[ok], "s", label="energy")
            a2.plot(cy.cycle_index[~ok], np.minimum(cy.coulombic_efficiency[~ok], 1.2), "x",
                    color="grey", label="not comparable (flagged)")
            a2.set_ylabel("efficiency")
            a2.set_xlabel("cycle")
            a2.legend()
            out.append(("Capacity and efficiency per cycle", _png(fig)))

            full = np.flatnonzero(cy.full_charge)
            if full.size:
                c = int(cy.cycle_index[full[-1]])
                sel = s["cycle_index"] == c
                try:
                    ic = incremental_capacity(s["t_s"][sel], s["voltage_v"][sel],
                                              s["current_a"][sel])
                    fig, ax = plt.subplots(figsize=(8, 3.5))
                    ax.plot(ic.voltage_v, ic.dqdv_ah_per_v)
                    ax.set_xlabel("voltage / V")
                    ax.set_ylabel("dQ/dV / Ah V⁻¹")
                    out.append((f"Incremental capacity, charge of cycle {c}", _png(fig)))
                except ValueError:
                    pass
    for k, sp in enumerate(run.spectra):
        f = np.asarray(sp["frequency_hz"], float)
        z = np.asarray(sp["z_real_ohm"], float) + 1j * np.asarray(sp["z_imag_ohm"], float)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot(z.real * 1e3, -z.imag * 1e3, "o", ms=3, label="measured")
        title = f"Nyquist, spectrum {k + 1}" + (f" ({sp['tag']})" if sp.get("tag") else "")
        try:
            fit = fit_spectrum(f, z)
            ff = np.geomspace(f.min(), f.max(), 200)
            zf = circuit_impedance(ff, fit.params)
            ax.plot(zf.real * 1e3, -zf.imag * 1e3, "-", label="circuit fit")
            title += f", R0 = {fit.params['r0_ohm'] * 1e3:.3g} ± " \
                     f"{fit.stderr['r0_ohm'] * 1e3:.2g} mΩ"
        except ValueError:
            pass
        ax.set_xlabel("Z' / mΩ")
        ax.set_ylabel("−Z'' / mΩ")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend()
        out.append((title, _png(fig)))
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x).lower()
    if isinstance(x, float):
        return f"{x:.5g}"
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in x.items())
    return str(x)


def _e(x: Any) -> str:
    return html.escape(_fmt(x))


def render_report(run: RunData, results: list[EntryResult]) -> str:
    """The report as one HTML document."""
    ctx = RunView(run)
    meta = run.meta
    cell = meta.get("cell") or {}
    inst = meta.get("instrument") or {}
    rows = []
    for r in results:
        crit = "<br>".join(
            f"{_e(c.metric)} {_e(c.comparison)} {_e(c.limit)} {_e(c.unit)}: "
            f"<b>{_e(c.value)}</b>"
            + (f" ± {_e(c.uncertainty)}" if c.uncertainty is not None else "")
            + f" → {_e(c.verdict)}"
            + (f" <i>({_e(c.reason)})</i>" if c.reason else "")
            for c in r.criteria)
        rules = sorted({c.decision_rule for c in r.criteria if c.decision_rule})
        rows.append(
            f"<tr class='{_e(r.verdict)}'><td>{_e(r.entry_id)}</td>"
            f"<td>{_e(r.title)}<br><small>{_e(r.standard)} cl. {_e(r.clause)}</small></td>"
            f"<td>{'<br>'.join(_e(d) for d in r.designations)}</td>"
            f"<td>{_e(', '.join(r.jurisdictions))}</td>"
            f"<td class='v'>{_e(r.verdict)}</td><td>{crit}</td>"
            f"<td><small>{'<br>'.join(_e(x) for x in rules)}</small></td></tr>")
    plots = "".join(f"<figure><img alt='{html.escape(t)}' src='{src}'>"
                    f"<figcaption>{html.escape(t)}</figcaption></figure>"
                    for t, src in _plots(run, ctx))
    calib = results[0].calibration if results else run.calibration or (
        "calibrated" if run.calibrated else "no calibration records")
    ident = [
        ("Run", f"{meta.get('run', {}).get('id', run.run_id)} "
                f"({meta.get('run', {}).get('state', '')})"),
        ("Cell", f"{cell.get('serial', '—')} — {cell.get('chemistry', '')} "
                 f"{cell.get('spec') or ''}, {cell.get('capacity_ah', '—')} Ah, "
                 f"{cell.get('discharge_cutoff_v', '—')}–{cell.get('charge_cutoff_v', '—')} V"),
        ("Protocol", f"{run.plan.name} ({run.plan.protocol_hash})"
                     + (f" — {run.template_note}" if run.template_note else "")),
        ("Channel", meta.get("channel") or "—"),
        ("Instrument", f"{inst.get('name', '—')} ({inst.get('driver', '')}, "
                       f"{inst.get('resource', '')}) {inst.get('idn') or ''}"),
        ("Calibration", calib),
        ("Started / ended", f"{meta.get('run', {}).get('started_at')} / "
                            f"{meta.get('run', {}).get('ended_at')}"),
        ("Samples", f"{run.samples['t_s'].size:,}"),
        ("Software", f"labdaq {_version()}"),
        ("Data SHA-256", data_sha256(run.samples) if run.samples["t_s"].size else "—"),
        ("Catalogue SHA-256", catalogue_sha256()),
        ("Generated", datetime.now(UTC).isoformat(timespec="seconds")),
    ]
    ident_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                         for k, v in ident)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>labdaq test report — run {_e(run.run_id)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }}
tr.pass td.v {{ background: #cfc; }} tr.fail td.v {{ background: #fbb; }}
tr.provisional td.v {{ background: #ffd; }} tr.not_evaluable td.v {{ background: #eee; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>Test report — run {_e(run.run_id)}, {html.escape(run.plan.name)}</h1>
<h2>Identity</h2><table id="identity">{ident_html}</table>
<h2>Verdicts</h2>
<p>Verdicts: pass, fail, provisional (the criterion's number is not yet confirmed against
the purchased standard), not evaluable (with the reason), reported (a measurement method
without acceptance criteria).</p>
<table id="verdicts"><tr><th>entry</th><th>clause</th><th>designations</th>
<th>jurisdictions</th><th>verdict</th><th>criteria</th><th>decision rule</th></tr>
{''.join(rows)}</table>
<h2>Plots</h2>{plots}
</body></html>
"""
