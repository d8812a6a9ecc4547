"""`kind: python`: a function of the user's own, installed package renders the images (imported, never fetched)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from PIL import Image

from d3builder.generators.backends.base import (
    Columns,
    Job,
    failed,
    ready_encoded,
    stated_columns,
)
from d3builder.generators.checker import RegistryError
from d3builder.generators.kinds import PythonEntry
from d3builder.generators.results import GenerationResult, fit, short_error

MAX_IMAGE_BYTES = 50_000_000
PIPELINE = "python"


class ImageFunction(Protocol):
    """What `callable: package.module:function` must be.

    Called once per batch with equal-length lists: the prompts, the negative prompts (None where a record
    has none), the (width, height) of each image and its seed (an int in [0, 2**32)); returns one image per
    prompt, in order: a PIL image (fitted to its size if it differs, then encoded like every generated image)
    or encoded bytes (kept exactly, like a real image). Image i should depend only on prompt i, negative
    prompt i, size i and seed i, so that a re-run renders the same records again. An exception fails the
    batch; each of its records is recorded as failed."""

    def __call__(self, prompts: list[str], negative_prompts: list[str | None], sizes: list[tuple[int, int]],
                 seeds: list[int]) -> Sequence[Image.Image | bytes]: ...


def load_callable(entry: PythonEntry) -> Callable[..., Sequence[Any]]:
    """Import the entry's function and check that it takes (prompts, negative_prompts, sizes, seeds)."""
    where = f"{entry.source}: entry '{entry.name}': key 'callable'"
    module_name, _, attribute = entry.callable.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RegistryError(f"{where}: module '{module_name}' cannot be imported here ({exc}); install the package "
                            "that provides it (d3builder imports it, it never fetches code)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: say how, in one line
        raise RegistryError(f"{where}: importing '{module_name}' failed: {short_error(exc)}") from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        raise RegistryError(f"{where}: '{module_name}' has no callable '{attribute}'")
    try:
        inspect.signature(function).bind([], [], [], [])
    except TypeError:
        raise RegistryError(f"{where}: '{entry.callable}' must take (prompts, negative_prompts, sizes, seeds), "
                            f"not {inspect.signature(function)}") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): trust it
    return function


class FunctionBackend:
    """The entry's function, imported once."""

    def __init__(self, entry: PythonEntry) -> None:
        self.entry = entry
        self.function = load_callable(entry)

    def columns(self) -> Columns:
        """Model (default python:<callable>) and what the entry states; no sampler, dtype or safety switches."""
        not_recorded = {"scheduler": "a python generator has no diffusers scheduler",
                        "dtype": "a python generator reports no dtype",
                        "safety_checker": "a python generator has no safety checker switch",
                        "watermark": "a python generator has no watermark switch"}
        return stated_columns(self.entry, PIPELINE, not_recorded)

    def provenance(self) -> dict[str, Any]:
        """The callable, where it was imported from, and the package version when it has one."""
        module = inspect.getmodule(self.function)
        package = importlib.import_module(self.entry.callable.split(".", 1)[0].split(":", 1)[0])
        return {"generator": self.entry.name, "kind": self.entry.kind, "callable": self.entry.callable,
                "file": getattr(module, "__file__", None), "version": getattr(package, "__version__", None),
                "model": self.entry.model, "revision": self.entry.revision, "steps": self.entry.steps,
                "guidance": self.entry.guidance}

    def render(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """Call the function on the batch and check what it returned, image by image."""
        sizes = [(j.width, j.height) for j in jobs]
        try:
            images = list(self.function([j.prompt for j in jobs], [j.negative_prompt or None for j in jobs], sizes,
                                        [j.seed for j in jobs]))
        except Exception as exc:  # noqa: BLE001 - the user's code failed: every record of the batch is recorded
            return [GenerationResult(seed=j.seed, width=j.width, height=j.height, error=short_error(exc),
                                     pipeline=PIPELINE) for j in jobs]
        if len(images) != len(jobs):
            return [failed(j, "bad_output", f"{self.entry.callable} returned {len(images)} images for {len(jobs)} "
                           "prompts", pipeline=PIPELINE) for j in jobs]
        return [self._one(job, image) for job, image in zip(jobs, images, strict=True)]

    def _one(self, job: Job, image: Any) -> GenerationResult:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return ready_encoded(job, bytes(image), MAX_IMAGE_BYTES, job.seed, PIPELINE)
        if not isinstance(image, Image.Image):
            return failed(job, "bad_output", f"returned {type(image).__name__}, not a PIL image or bytes",
                          pipeline=PIPELINE)
        try:
            rgb = image.convert("RGB")  # loads a lazily decoded image, which must really decode
        except Exception as exc:  # noqa: BLE001 - whatever the image object holds, it is no usable image
            return failed(job, "bad_output", f"the returned image does not load: {short_error(exc)}", pipeline=PIPELINE)
        rgb, native = fit(rgb, job.width, job.height)
        return GenerationResult(seed=job.seed, width=job.width, height=job.height, image=rgb, resized_from=native,
                                pipeline=PIPELINE)
