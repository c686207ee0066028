"""Deprecated home of MixpertClient, kept for one release: import it from mixpert_export.serving.client."""

from .serving.client import Encoded, MixpertClient  # noqa: F401
