"""Pydantic schemas of a run's alert subscriptions (kept apart from the ORM model)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from labdaq.api.schemas import UtcDatetime
from labdaq.config import AlertSubscription

AlertKind = Literal["completed", "paused_fault", "aborted_safety", "node_down", "node_up"]
# One line, no control characters (PostgreSQL refuses a NUL in text).
Email = Annotated[str, StringConstraints(
    max_length=320, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
Webhook = Annotated[str, StringConstraints(
    max_length=500, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")]


class SubscriptionIn(BaseModel):
    """Who to tell about this run: an e-mail address or a webhook URL (exactly one), and
    which alerts (all of them if left out)."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = Field(default=None, examples=["engineer@lab.example"])
    webhook: Webhook | None = Field(default=None, examples=[None])
    kinds: list[AlertKind] | None = Field(default=None, min_length=1, max_length=5,
                                          examples=[["completed", "aborted_safety"]])

    @model_validator(mode="after")
    def _one_target(self) -> SubscriptionIn:
        if (self.email is None) == (self.webhook is None):
            raise ValueError("name exactly one of email or webhook")
        return self

    def subscription(self) -> AlertSubscription:
        if self.kinds:
            return AlertSubscription(email=self.email, webhook=self.webhook,
                                     kinds=[str(k) for k in self.kinds])
        return AlertSubscription(email=self.email, webhook=self.webhook)


class SubscriptionOut(BaseModel):
    id: int
    run_id: int
    email: str | None
    webhook: str | None
    kinds: list[str]
    created_by: str
    created_at: UtcDatetime | None
