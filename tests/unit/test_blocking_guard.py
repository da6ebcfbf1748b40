"""The suite's blockbuster fixture (tests/conftest.py) is on: a blocking call in a coroutine fails the test."""

from __future__ import annotations

import asyncio
import time

import pytest
from blockbuster import BlockingError


async def test_sleep_on_the_loop_fails() -> None:
    with pytest.raises(BlockingError, match=r"time\.sleep"):
        time.sleep(0.01)  # noqa: ASYNC251 - the blocking call under test


async def test_file_read_on_the_loop_fails() -> None:
    with open(__file__, "rb") as f, pytest.raises(BlockingError, match=r"BufferedReader\.read"):  # noqa: ASYNC230
        f.read()


def test_sync_test_driving_a_loop_is_checked_too() -> None:
    async def blocks() -> None:
        time.sleep(0.01)  # noqa: ASYNC251 - the blocking call under test

    with pytest.raises(BlockingError, match=r"time\.sleep"):
        asyncio.run(blocks())


async def test_a_thread_may_block() -> None:
    await asyncio.to_thread(time.sleep, 0.01)
