"""The v2 stream client against a scripted fake MAVI on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from pydantic import SecretStr

from streamwatch.config import RetryConfig
from streamwatch.http import parse_retry_after
from streamwatch.mavi.errors import (
    AuthError,
    CapacityError,
    InsufficientBalance,
    RateLimited,
    RejectedRequest,
    TransientError,
)
from streamwatch.mavi.streams import StartRequest, StreamClient
from tests.fakes.mavi_api import Answer, FakeMavi

REQUEST = StartRequest(
    "rtsp://cam/1", content_moderation=True, logo_detection=False, fps=2, max_logos=7
)
OK = {"code": 200, "message": "success", "data": {"task_id": "t-1", "message": "started"}}


@pytest.fixture
async def fake() -> AsyncIterator[FakeMavi]:
    async with FakeMavi().running() as f:
        yield f


@pytest.fixture
async def client(fake: FakeMavi) -> AsyncIterator[StreamClient]:
    async with aiohttp.ClientSession() as session:
        yield StreamClient(
            session=session,
            base_url=fake.url,
            api_key=SecretStr("sk-mai-abc"),
            retry=RetryConfig(attempts=3, initial_seconds=0.01, max_seconds=0.02),
            timeout_seconds=0.5,
        )


async def test_start_sends_the_documented_request(fake, client):
    """Start posts the documented body with the bare key in Authorization."""
    fake.answers = [Answer(200, OK)]
    assert await client.start(REQUEST) == "t-1"
    seen = fake.seen[0]
    assert seen.path == "/v2/stream/start"
    assert seen.headers["Authorization"] == "sk-mai-abc"
    assert seen.body == {
        "url": "rtsp://cam/1",
        "enable_content_moderation": True,
        "enable_logo_detection": False,
        "fps": 2,
        "max_logos": 7,
    }


async def test_string_code_is_accepted(fake, client):
    """`code` documented as a string and shown as an integer: both work."""
    fake.answers = [Answer(200, {**OK, "code": "200"})]
    assert await client.start(REQUEST) == "t-1"


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_transient_failures_are_retried(fake, client, status):
    """429 and 5xx are retried until success, within the attempt bound."""
    fake.answers = [Answer(status, {"message": "busy"}), Answer(200, OK)]
    assert await client.start(REQUEST) == "t-1"
    assert len(fake.seen) == 2


async def test_retries_are_bounded(fake, client):
    """After the configured attempts the last error is raised."""
    fake.answers = [Answer(503, {})] * 5
    with pytest.raises(TransientError):
        await client.start(REQUEST)
    assert len(fake.seen) == 3


async def test_timeouts_are_retried(fake, client):
    """A request that times out is retried like a 5xx."""
    fake.answers = [Answer(200, OK, delay=2.0), Answer(200, OK)]
    assert await client.start(REQUEST) == "t-1"
    assert len(fake.seen) == 2


async def test_429_carries_retry_after(fake, client):
    """The Retry-After header is read into the error that drives the backoff."""
    fake.answers = [Answer(429, {}, headers={"Retry-After": "7"})] * 3
    with pytest.raises(RateLimited) as info:
        await client.start(REQUEST)
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize(("status", "error"), [(401, AuthError), (402, InsufficientBalance)])
async def test_auth_and_balance_are_never_retried(fake, client, status, error):
    """401 and 402 raise their own errors on the first answer."""
    fake.answers = [Answer(status, {"message": "no"})]
    with pytest.raises(error):
        await client.start(REQUEST)
    assert len(fake.seen) == 1


async def test_other_4xx_at_start_is_capacity(fake, client):
    """Another 4xx at start is read as 'retry later' (capacity), not retried at once."""
    fake.answers = [Answer(409, {"message": "limit"})]
    with pytest.raises(CapacityError):
        await client.start(REQUEST)
    assert len(fake.seen) == 1


async def test_error_code_inside_a_200_is_mapped(fake, client):
    """A 200 whose body carries code 402 is the balance error, not a success."""
    fake.answers = [Answer(200, {"code": "402", "message": "Insufficient balance"})]
    with pytest.raises(InsufficientBalance):
        await client.start(REQUEST)


@pytest.mark.parametrize(
    "body", [None, {"code": 200, "data": {}}, {"code": 200, "data": None}, {"code": "abc"}]
)
async def test_answers_without_a_task_id_are_rejected(fake, client, body):
    """A 200 that does not carry a task id is an error, never a silent success."""
    fake.answers = [Answer(200, body)]
    with pytest.raises(RejectedRequest):
        await client.start(REQUEST)


@pytest.mark.parametrize(
    "task_id", ["../../../../tmp/x", "/etc/passwd", "a/b", "..", "a\\b", "a\x00b", "x" * 129]
)
async def test_task_ids_that_are_not_ids_are_rejected(fake, client, task_id):
    """A start answer whose task id could name a path (or is over 128 characters) is an
    error: the id never reaches the store or the evidence archive."""
    fake.answers = [Answer(200, {"code": 200, "data": {"task_id": task_id}})]
    with pytest.raises(RejectedRequest) as info:
        await client.start(REQUEST)
    assert task_id not in str(info.value)


async def test_stop_and_already_stopped(fake, client):
    """Stop returns True when stopped now and False on 400 (unknown or already stopped)."""
    fake.answers = [Answer(200, {"code": 200, "data": {"task_id": "t-1"}}), Answer(400, {})]
    assert await client.stop("t-1") is True
    assert await client.stop("t-1") is False
    assert fake.seen[0].body == {"task_id": "t-1"}


async def test_errors_never_show_the_key(fake, client):
    """Error messages name the problem, never the API key."""
    fake.answers = [Answer(401, {"message": "bad key"})]
    with pytest.raises(AuthError) as info:
        await client.start(REQUEST)
    assert "sk-mai-abc" not in str(info.value)


def test_retry_after_forms():
    """Retry-After is read as seconds or as an HTTP date; junk is ignored."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
