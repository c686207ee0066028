"""Deprecated home of MixpertPipeline, kept for one release: import it from mixpert_export.runtime.pipeline."""

from .runtime.pipeline import ImageResult, MixpertPipeline, PipelineStats  # noqa: F401
