"""The protocol template an imported run's test followed: checked against the shipped
templates (``seeds/protocols/``), declared at import or later (audited), and what it
means for the catalogue evaluation — an imported run has no labdaq plan, so its entries
are picked by the declared template, and without one it says so instead of judging
nothing silently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labdaq.errors import Invalid, NotFound
from labdaq.protocol import CellLimits, ResolvedProtocol
from labdaq.protocol.templates import list_templates
from labdaq.storage import models as m

__all__ = ["NO_TEMPLATE", "RunTemplate", "check_template", "run_template", "set_template"]

NO_TEMPLATE = (
    "imported without a protocol template: no catalogue entry applies by protocol. Name "
    "the template the other lab's test followed (template at import, or PATCH "
    "/api/v1/imports/{id}), or name the entries to judge")
_STEPS_UNTAGGED = (
    "imported ({format}) as following template {template!r}: that template's catalogue "
    "entries apply; the file's steps carry no template tags, so criteria that need a "
    "tagged step are not evaluable")


def check_template(name: str | None) -> str | None:
    """``name`` if it is a shipped template (or None); Invalid (422) otherwise."""
    if name is None:
        return None
    known = list_templates()
    if name not in known:
        raise Invalid("unknown protocol template", [
            {"loc": "template", "msg": f"{name!r}; one of {', '.join(known)}"}])
    return name


def set_template(session: Session, import_id: int, template: str | None,
                 actor: str) -> m.Import:
    """Declare (or clear, with None) the template an imported run followed, with an audit
    event saying before and after. Flushes; the caller commits."""
    row = session.get(m.Import, import_id)
    if row is None:
        raise NotFound(f"no import {import_id}")
    check_template(template)
    before = row.template
    row.template = template
    session.add(m.Event(
        run_id=row.run_id, kind="audit", actor=actor,
        message=f"imported run's protocol template set to {template or 'none'}",
        data={"import_id": row.id, "before": {"template": before},
              "after": {"template": template}}))
    session.flush()
    return row


@dataclass(frozen=True)
class RunTemplate:
    """How the catalogue picks a run's entries: by ``protocol`` (a labdaq run's plan name,
    an imported run's declared template; None: an imported run without one). ``note``
    says what that means for an imported run; ``rated`` is an imported run's cell as
    registered now (see :func:`run_template`)."""

    protocol: str | None
    imported: bool
    note: str | None = None
    rated: CellLimits | None = None

    def as_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"template": self.protocol, "imported": self.imported,
                               "template_note": self.note}
        if self.rated is not None:
            out["rated"] = self.rated
        return out


def _rated(session: Session, run: m.Run, imp: m.Import) -> CellLimits | None:
    """An imported run's cell ratings as registered now, not as frozen in its plan: the
    lab enters the datasheet values after the import. A cell the import made from the
    file and nobody has edited since has no rated capacity (its ``capacity_ah`` is a
    placeholder), so criteria judged against the rating are not evaluable, not failed."""
    cell = session.get(m.Cell, run.cell_id)
    if cell is None:
        return None
    plan = ResolvedProtocol.model_validate(run.plan).cell
    placeholder = (cell.serial == f"import-{imp.file_sha256[:12]}"
                   and cell.updated_at is None)
    return CellLimits(
        capacity_ah=None if placeholder else cell.capacity_ah,
        charge_cutoff_v=cell.charge_cutoff_v, discharge_cutoff_v=cell.discharge_cutoff_v,
        max_charge_current_a=cell.max_charge_current_a or plan.max_charge_current_a,
        max_discharge_current_a=cell.max_discharge_current_a or plan.max_discharge_current_a,
        min_temperature_c=cell.min_temperature_c, max_temperature_c=cell.max_temperature_c)


def run_template(session: Session, run: m.Run) -> RunTemplate:
    imp = session.scalar(select(m.Import).where(m.Import.run_id == run.id))
    if imp is None:
        return RunTemplate(str(run.plan.get("name", "")), False)
    rated = _rated(session, run, imp)
    if imp.template is None:
        return RunTemplate(None, True, NO_TEMPLATE, rated)
    return RunTemplate(imp.template, True,
                       _STEPS_UNTAGGED.format(format=imp.format, template=imp.template),
                       rated)
