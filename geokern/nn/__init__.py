"""Drop-in nn.Modules built on geokern ops."""

from geokern.nn.retrieval import GeodesicRetrieval  # noqa: F401

__all__ = ["GeodesicRetrieval"]
