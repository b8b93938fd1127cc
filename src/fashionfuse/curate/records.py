"""The normalised record every source reader yields and every filter consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


class MalformedRow(UserError, ValueError):
    """A raw row that cannot be turned into a record; the message says why."""


@dataclass
class Record:
    """One normalised training example: a system message plus alternating user/assistant turns."""

    id: str
    source: str
    kind: str  # "qa" | "chat"
    system: str | None
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}, ...]
    meta: dict = field(default_factory=dict)  # answering model, language, file:line, ...

    def to_json(self) -> dict:
        # hand-written: dataclasses.asdict's deep copy dominated curation time
        return {"id": self.id, "source": self.source, "kind": self.kind, "system": self.system,
                "messages": [dict(m) for m in self.messages], "meta": dict(self.meta)}

    @property
    def responses(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def queries(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass(frozen=True)
class Rejection:
    """Why a raw row or record was dropped."""

    id: str
    filter: str
    reason: str
    where: str = ""  # file:line for raw rows

    def to_json(self) -> dict:
        out = {"id": self.id, "filter": self.filter, "reason": self.reason}
        if self.where:
            out["where"] = self.where
        return out
