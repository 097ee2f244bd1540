"""Pydantic schemas of a run's alert subscriptions (kept apart from the ORM model)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from labdaq.api.schemas import UtcDatetime
from labdaq.config import ALERT_KINDS, AlertSubscription

AlertKind = Literal["completed", "paused_fault", "aborted_safety", "node_down", "node_up"]
# One line, no control characters (PostgreSQL refuses a NUL in text). The C1 controls
# (U+0080-U+009F) and U+FEFF are named, not left to ``\s``: pydantic's (Rust) ``\s``
# matches U+0085 and not U+FEFF, a JSON Schema (ECMA-262) one the other way round, so
# schemathesis generated a schema-valid address with U+0085 that was refused (422).
Email = Annotated[str, StringConstraints(
    max_length=320,
    pattern=r"^[^@\s\x00-\x1f\x7f-\x9f\ufeff]+@[^@\s\x00-\x1f\x7f-\x9f\ufeff]+$")]
Webhook = Annotated[str, StringConstraints(
    max_length=500, pattern=r"^https?://[^\s\x00-\x1f\x7f-\x9f\ufeff]+$")]


Kinds = Annotated[list[AlertKind], Field(min_length=1, max_length=5,
                                          examples=[["completed", "aborted_safety"]])]


class _Subscribe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Which alerts (all of them if left out).
    kinds: Kinds | None = None

    def _kinds(self) -> list[str]:
        return [str(k) for k in self.kinds] if self.kinds else list(ALERT_KINDS)


class SubscribeEmail(_Subscribe):
    """Tell this e-mail address about the run."""

    email: Email = Field(examples=["engineer@lab.example"])

    def subscription(self) -> AlertSubscription:
        return AlertSubscription(email=self.email, kinds=self._kinds())


class SubscribeWebhook(_Subscribe):
    """POST this run's alerts to this URL (JSON, docs/deploy.md "Alerts")."""

    webhook: Webhook = Field(examples=["https://hooks.lab.example/labdaq"])

    def subscription(self) -> AlertSubscription:
        return AlertSubscription(webhook=self.webhook, kinds=self._kinds())


#: Exactly one of email or webhook: each form forbids the other's field, so the schema
#: says it too (a body with both or neither matches no form).
SubscriptionIn = SubscribeEmail | SubscribeWebhook


class SubscriptionOut(BaseModel):
    id: int
    run_id: int
    email: str | None
    webhook: str | None
    kinds: list[str]
    created_by: str
    created_at: UtcDatetime | None
