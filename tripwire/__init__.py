"""Tripwire: catch runaway LLM agents while they run."""

from importlib.metadata import PackageNotFoundError, version

from tripwire.errors import TripwireError

try:
    __version__ = version("tripwire")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["TripwireError", "__version__"]
