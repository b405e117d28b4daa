"""The built-in MAVI emulator: runs the daemon, demos and tests with no account."""

from streamwatch.emulator.streams import API_PREFIX, Emulator, Script

__all__ = ["API_PREFIX", "Emulator", "Script"]
