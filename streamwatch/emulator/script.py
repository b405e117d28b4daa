"""The emulator's script language: what one stream URL does (per-segment outcomes, start
failures, duplicate and reordered delivery, following the real source).

`EmulatorScript` is the validated form the config file's `[[emulator.scripts]]`, the
`streamwatch emulator --script` file and the emulator's control API share; `Script` is what
the emulator runs. The config imports it from here, so that the emulator needs nothing of the
config (import-linter keeps the emulator apart from the daemon).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["EmulatorScript", "Script"]


class EmulatorScript(BaseModel):
    """What the emulator does for one stream URL, as written in `[[emulator.scripts]]`, a
    `--script` file or the control API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    outcomes: list[str] = Field(
        default_factory=lambda: ["safe"],
        description='Per segment: "safe", "unsafe", "logo:NAME", "error".',
    )
    then: str = Field(
        default="repeat",
        description='After the outcomes: "repeat", or "end:14|15|16|402" to end the task.',
    )
    start_failures: list[int] = Field(
        default_factory=list, description="HTTP statuses answered to the first starts."
    )
    duplicate: bool = Field(default=False, description="Deliver every callback twice.")
    reorder: bool = Field(default=False, description="Swap each pair of segment callbacks.")
    follow_source: bool = Field(
        default=False,
        description="Probe the URL (ffprobe) while the task runs: no segment before the source "
        "is seen, and the task ends with status 15 once it is gone.",
    )

    @field_validator("outcomes")
    @classmethod
    def _outcomes(cls, v: list[str]) -> list[str]:
        for item in v:
            if item not in ("safe", "unsafe", "error") and not item.startswith("logo:"):
                raise ValueError(f"unknown outcome {item!r}: use safe, unsafe, error, logo:NAME")
        return v

    @field_validator("then")
    @classmethod
    def _then(cls, v: str) -> str:
        if v not in ("repeat", "end:14", "end:15", "end:16", "end:402"):
            raise ValueError('use "repeat" or "end:14", "end:15", "end:16", "end:402"')
        return v


@dataclass
class Script:
    """What one stream URL does: per-segment outcomes, then repeat or end; start failures;
    duplicate and out-of-order delivery; whether its task follows the real source."""

    outcomes: list[str] = field(default_factory=lambda: ["safe"])
    then: str = "repeat"
    start_failures: list[int] = field(default_factory=list)
    duplicate: bool = False
    reorder: bool = False
    follow_source: bool = False

    @classmethod
    def from_config(cls, script: EmulatorScript) -> Script:
        return cls(
            outcomes=list(script.outcomes),
            then=script.then,
            start_failures=list(script.start_failures),
            duplicate=script.duplicate,
            reorder=script.reorder,
            follow_source=script.follow_source,
        )
