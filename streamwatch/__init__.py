"""streamwatch: keep MAVI live-stream moderation running, stored, accounted and watched."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
