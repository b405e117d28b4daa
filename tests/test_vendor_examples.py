"""The vendor's own request examples (shared/seeds/000_*.txt), replayed as written with
`requests`, the library they use, against the emulator: only the base URL differs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import requests

from streamwatch.emulator import Emulator

KEY = "sk-mai-vendor"

# The response examples of shared/seeds/000_*.txt, transcribed with the JSON type each field has
# there (its "Response Structure" table where the example is loose: `fragmentStartTime` is shown
# as "int" but typed string, so MAVI sends whole seconds as strings). A list holds the shape of
# its elements; delete answers no `data` at all.
S, N = "string", "number"
VIDEO = {"videoNo": S, "videoName": S, "videoStatus": S, "uploadTime": S}
DOCUMENTED: dict[str, dict[str, Any]] = {
    "upload": {"code": S, "msg": S, "data": VIDEO},
    "searchDB": {
        "code": S,
        "msg": S,
        "data": {"page": N, "current": N, "total": N, "pageSize": N, "videoData": [VIDEO]},
    },
    "searchAI": {"code": S, "msg": S, "data": {"videos": [VIDEO]}},
    "searchVideoFragment": {
        "code": S,
        "msg": S,
        "data": {
            "videos": [{**VIDEO, "duration": S, "fragmentStartTime": S, "fragmentEndTime": S}]
        },
    },
    "chat": {"code": S, "msg": S, "data": {"msg": S}},
    "subTranscription": {"code": S, "msg": S, "data": {"taskNo": S}},
    "getTranscription": {
        "code": S,
        "msg": S,
        "data": {
            "status": S,
            "type": S,
            "videoNo": S,
            "taskNo": S,
            "transcriptions": [{"id": N, "startTime": N, "endTime": N, "content": S}],
        },
    },
    "delete": {"code": S, "msg": S},
}


def misfits(value: Any, shape: Any, where: str = "") -> list[str]:
    """Where `value` differs from a documented shape: missing or extra keys, wrong types."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where or '.'}: {type(value).__name__}, not an object"]
        found = [f"{where}.{k}: missing" for k in shape.keys() - value.keys()]
        found += [f"{where}.{k}: not documented" for k in value.keys() - shape.keys()]
        for k in shape.keys() & value.keys():
            found += misfits(value[k], shape[k], f"{where}.{k}")
        return found
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not an array"]
        return [m for i, v in enumerate(value) for m in misfits(v, shape[0], f"{where}[{i}]")]
    if shape == S:
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return [] if is_number else [f"{where}: {value!r} is not a number"]


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(api_key=KEY)
    async with e.running():
        yield e


def vendor_session(base: str, video: Path, callback: str) -> list[dict[str, Any]]:
    """Each example as the seed writes it, in the order a user would run them."""
    headers = {"Authorization": KEY}
    answers = []
    with video.open("rb") as handle:
        data = {"file": ("my video.mp4", handle, "video/mp4")}
        params = {"callBackUri": callback}
        up = requests.post(
            f"{base}/upload", files=data, params=params, headers=headers, timeout=10
        ).json()
    answers.append(up)
    video_no = up["data"]["videoNo"]
    params2: dict[str, str | int] = {
        "startTime": 0,
        "endTime": 99999999999999,
        "videoStatus": "UNPARSE",
        "page": 1,
        "pageSize": 100,
    }
    answers.append(
        requests.get(f"{base}/searchDB", params=params2, headers=headers, timeout=10).json()
    )
    answers.append(
        requests.get(
            f"{base}/searchDB", params={"page": 2, "pageSize": 30}, headers=headers, timeout=10
        ).json()
    )
    answers.append(
        requests.post(
            f"{base}/searchAI", headers=headers, json={"searchValue": "my video"}, timeout=10
        ).json()
    )
    answers.append(
        requests.post(
            f"{base}/searchVideoFragment",
            headers=headers,
            json={"videoNos": [video_no], "searchValue": "a person"},
            timeout=10,
        ).json()
    )
    chat = requests.post(
        f"{base}/chat",
        headers=headers,
        timeout=10,
        json={"videoNos": [video_no], "message": "what happens?", "history": [], "stream": False},
    )
    answers.append(chat.json())
    sub = requests.post(
        f"{base}/subTranscription",
        headers=headers,
        timeout=10,
        json={"videoNo": video_no, "type": "AUDIO/VIDEO", "callBackUri": callback},
    )
    answers.append(sub.json())
    answers.append(
        requests.get(
            f"{base}/getTranscription",
            headers=headers,
            timeout=10,
            params={"taskNo": sub.json()["data"]["taskNo"]},
        ).json()
    )
    answers.append(
        requests.delete(f"{base}/delete", headers=headers, json=[video_no], timeout=10).json()
    )
    return answers


async def test_vendor_examples_run_against_the_emulator(emu, tmp_path: Path):
    """Every documented request example gets a `0000` answer of the documented shape."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 2048)
    answers = await asyncio.to_thread(
        vendor_session, emu.batch_url, video, "http://127.0.0.1:9/none"
    )
    assert [a["code"] for a in answers] == ["0000"] * 9
    assert set(answers[0]["data"]) == {"videoNo", "videoName", "videoStatus", "uploadTime"}
    assert answers[0]["data"]["videoName"] == "my video.mp4"
    assert set(answers[1]["data"]) == {"page", "current", "total", "pageSize", "videoData"}
    assert answers[1]["data"]["total"] == 1
    assert answers[2]["data"]["videoData"] == []
    assert "msg" in answers[5]["data"]
    assert set(answers[7]["data"]) >= {"status", "type", "videoNo", "taskNo", "transcriptions"}


async def test_every_answer_has_the_documented_fields_and_types(emu, tmp_path: Path):
    """Each example's answer has exactly the fields of the vendor's response example, each of
    the documented JSON type (strings stay strings), with lists non-empty where data exists."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 2048)
    emu.library.polls_to_finish = 1  # the one getTranscription of the session sees lines
    answers = await asyncio.to_thread(
        vendor_session, emu.batch_url, video, "http://127.0.0.1:9/none"
    )
    calls = ["upload", "searchDB", "searchDB", "searchAI", "searchVideoFragment", "chat"]
    calls += ["subTranscription", "getTranscription", "delete"]
    assert {
        f"{n}:{call}": misfits(answer, DOCUMENTED[call])
        for n, (call, answer) in enumerate(zip(calls, answers, strict=True))
    } == {f"{n}:{call}": [] for n, call in enumerate(calls)}
    assert answers[4]["data"]["videos"], "the clip search found the uploaded video"
    assert answers[7]["data"]["transcriptions"], "the transcription has lines"
