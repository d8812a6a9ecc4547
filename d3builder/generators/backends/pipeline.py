"""`kind: diffusers`: a registry entry loaded as diffusers pipelines (the runtime), rendering one size per batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from d3builder.generators.backends.base import Columns, Job
from d3builder.generators.registry import GeneratorEntry
from d3builder.generators.results import GenerationResult

if TYPE_CHECKING:
    import torch


class PipelineBackend:
    """The entry's pipeline (and cascade stages) loaded once on a device."""

    def __init__(self, entry: GeneratorEntry, device: str | torch.device, speed: Mapping[str, Any]) -> None:
        # runtime holds the model stack: it loads with the first diffusers backend, not when the command line starts
        from d3builder.generators.runtime import load_generator

        self.entry = entry
        self.loaded = load_generator(entry, device, **speed)
        self._provenance = self.loaded.provenance()

    def columns(self) -> Columns:
        """Model, revision, sampler, dtype, steps, guidance; safety checker and watermark off."""
        prov = self._provenance
        return Columns(model=self.entry.model, pipeline=self.entry.pipeline, model_revision=prov["revision"], scheduler=prov["scheduler"],
                       dtype=prov["dtype"], num_inference_steps=self.entry.steps, guidance_scale=self.entry.guidance,
                       safety_checker=bool(prov["safety_checker"]), watermark=bool(prov["watermark"]))

    def provenance(self) -> dict[str, Any]:
        """The runtime's provenance: pipelines, sampler configs, switches, versions."""
        return self._provenance

    def render(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """One pipeline call for a batch of one output size."""
        width, height = jobs[0].width, jobs[0].height
        if any((j.width, j.height) != (width, height) for j in jobs) or width is None or height is None:
            raise ValueError("a diffusers batch needs one output size")
        return self.loaded.generate([j.prompt for j in jobs], [j.negative_prompt for j in jobs], width, height,
                                    [j.seed for j in jobs])
