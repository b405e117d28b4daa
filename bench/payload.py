"""The segment callback the ingestion benchmarks post: about 700 bytes, as MAVI sends them
(both features on, a signed clip URL), one in nine flagged unsafe.

`segment_body` makes one in Python; `wrk_script` is the same body as a wrk Lua script that
gives every request the next segment index."""

from __future__ import annotations

import json

__all__ = ["segment_body", "wrk_script"]

# A clip URL as long as a signed CDN URL: it is most of a real callback's size.
_URL = (
    "https://cdn.mavi.invalid/live/{task}/segment_{index}.mp4?Expires=1893456000"
    "&Signature=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFy"
    "&Key-Pair-Id=APKAEXAMPLEKEYID0123"
)


def _doc(task_id: str, index: str, start: str, end: str, unsafe: str) -> str:
    doc = {
        "code": 200,
        "message": "SUCCESS",
        "task_id": task_id,
        "data": {
            "status": 0,
            "message": "Segment processed successfully",
            "data": {
                "segment_index": "@INDEX@",
                "start_time": "@START@",
                "end_time": "@END@",
                "video_url": _URL.format(task=task_id, index="@INDEX@"),
                "content_moderation": {"has_unsafe_content": "@UNSAFE@", "frames_processed": 5},
                "logo_detection": {"has_logo": False, "logos": [], "frames_processed": 5},
                "processing_time_ms": "812",
            },
            "token": {
                "input": 1200,
                "output": 40,
                "total": 1240,
                "video_tokens": 1100,
                "text_tokens": 140,
            },
        },
    }
    return (
        json.dumps(doc)
        .replace('"@INDEX@"', index)
        .replace("@INDEX@", index)
        .replace("@START@", start)
        .replace("@END@", end)
        .replace('"@UNSAFE@"', unsafe)
    )


def segment_body(task_id: str, index: int) -> bytes:
    """The callback of segment `index` of `task_id`."""
    return _doc(
        task_id,
        str(index),
        f"{index * 5}.0",
        f"{index * 5 + 5}.0",
        "true" if index % 9 == 0 else "false",
    ).encode()


def wrk_script(task_id: str, first: int) -> str:
    """A wrk script posting `segment_body(task_id, i)` for i = first, first + 1, … (run it
    with one thread, `-t1`: each thread would count from `first`), and printing one
    `RESULT {json}` line when done."""
    template = _doc(task_id, "%d", "%d.0", "%d.0", "%s")
    return f"""
local template = [==[{template}]==]
local counter = {first}
request = function()
  local i = counter
  counter = counter + 1
  local unsafe = (i % 9 == 0) and "true" or "false"
  local body = string.format(template, i, i * 5, i * 5 + 5, i, unsafe)
  return wrk.format("POST", nil, {{["Content-Type"] = "application/json"}}, body)
end
done = function(summary, latency, requests)
  io.write(string.format(
    'RESULT {{"requests": %d, "errors": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f,'
    .. ' "max_ms": %f}}\\n',
    summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""
