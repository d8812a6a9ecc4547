"""What every generator backend shares: the job it renders, the columns it fills, its failures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from d3builder.generators.kinds import HttpEntry, PythonEntry
from d3builder.generators.results import GenerationResult
from d3builder.imaging.inspection import inspect_image

FAILURE_REASONS = frozenset({
    "missing",          # folder: no image for this record id
    "ambiguous",        # folder: several files for one id
    "bad_image",        # bytes that are no usable image (inspect_image says why)
    "bad_output",       # a python function returned something else than one image per prompt
    "bad_response",     # an API answered, but not with an image where the entry says it is
    "http_status",      # an API or image URL answered with an error status (after retries for 429/5xx)
    "timeout",          # no complete answer within timeout_s (after retries)
    "connection_error", # the connection failed (after retries)
    "too_large",        # a response over max_response_bytes / max_image_bytes
    "refused_url",      # a redirect or image URL that is not http(s)
    "spend_cap",        # max_requests reached in this run; retried by a later run
})
"""Counted reasons of failed records besides diffusers' nan_output, encode_error and exception:<type>."""


@dataclass(frozen=True)
class Job:
    """One image to render: a record's prompts with its seed and output size (None: the source decides)."""

    id: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int | None
    height: int | None


@dataclass(frozen=True)
class Columns:
    """The provenance columns a generator fills in each gen row; `not_recorded` says why the null ones are null."""

    model: str | None
    pipeline: str | None = None
    model_revision: str | None = None
    scheduler: str | None = None
    dtype: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    safety_checker: bool | None = None
    watermark: bool | None = None
    not_recorded: Mapping[str, str] = field(default_factory=dict)
    encoded_here: bool = True
    """Images come as pixels, encoded per the encoding mix (diffusers, python); False: as files kept as made."""


def stated_columns(entry: PythonEntry | HttpEntry, pipeline: str, not_recorded: dict[str, str], *,
                   gives: str = "states", encoded_here: bool = True) -> Columns:
    """The columns of an entry that states its own model, revision, steps and guidance; those it leaves out join
    `not_recorded` (`gives`: how the entry gives steps and guidance, e.g. "sends")."""
    stated = {"model_revision": (entry.revision, "states no revision"),
              "num_inference_steps": (entry.steps, f"{gives} no steps"),
              "guidance_scale": (entry.guidance, f"{gives} no guidance")}
    not_recorded.update({column: f"the entry {why}" for column, (value, why) in stated.items() if value is None})
    return Columns(model=entry.model, pipeline=pipeline, model_revision=entry.revision,
                   num_inference_steps=entry.steps, guidance_scale=entry.guidance, not_recorded=not_recorded,
                   encoded_here=encoded_here)


class Backend(Protocol):
    """A loaded generator of one kind, as the render engine drives it."""

    def columns(self) -> Columns:
        """The generator-wide provenance columns of its gen rows."""

    def provenance(self) -> dict[str, Any]:
        """JSON-able description of how the images are made (stored in each unit's stats); never a secret."""

    def render(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """One result per job, in order; a failure is a result with its reason, never an exception."""


def failed(job: Job, reason: str, detail: str, **extra: Any) -> GenerationResult:
    """A failed result whose error reads '<reason>: <detail>' (reason one of FAILURE_REASONS)."""
    assert reason in FAILURE_REASONS, reason
    return GenerationResult(seed=job.seed, width=job.width, height=job.height, error=f"{reason}: {detail}", **extra)


def ready_encoded(job: Job, data: bytes, max_bytes: int, seed: int | None, pipeline: str,
                  fields: Mapping[str, Any] | None = None) -> GenerationResult:
    """Bytes encoded elsewhere, kept exactly when they decode (bomb guard on), with their real size and format."""
    inspection = inspect_image(data, max_bytes)
    if inspection.error is not None:
        return failed(job, "bad_image", inspection.error, pipeline=pipeline, fields=dict(fields or {}))
    return GenerationResult(seed=seed, width=inspection.width, height=inspection.height, data=bytes(data),
                            encoding=inspection.encoding, pipeline=pipeline, fields=dict(fields or {}))
