"""The shape of a MAVI task id, checked wherever one comes in from the wire.

Task ids name files (the evidence archive keeps ``<stream>/<task_id>/…``), rows and log
fields, so only ids that are safe as a single path segment are accepted: 1 to 128 ASCII
letters, digits, ``-`` and ``_``, starting with a letter or digit. MAVI's are UUIDs.
"""

from __future__ import annotations

import re

__all__ = ["TASK_ID_MAX", "is_task_id"]

TASK_ID_MAX = 128
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def is_task_id(value: object) -> bool:
    """Is `value` a task id streamwatch accepts?"""
    return isinstance(value, str) and _TASK_ID.fullmatch(value) is not None
