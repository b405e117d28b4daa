"""The built-in MAVI emulator: runs the daemon, demos and tests with no account.

It is a program of its own (`streamwatch emulator`): it imports nothing of the daemon, only
leaf helpers (http, pricing, probe, redact, background); import-linter keeps it so."""

from streamwatch.emulator.script import EmulatorScript, Script
from streamwatch.emulator.streams import API_PREFIX, Emulator

__all__ = ["API_PREFIX", "Emulator", "EmulatorScript", "Script"]
