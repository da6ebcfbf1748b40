"""A harness that runs one source through its connector and keeps what it produced."""

from __future__ import annotations

from collections import Counter

import pytest

from trawl.config import ApiSource, HtmlSource
from trawl.connectors import SourceContext, SourceStats, connector_for
from trawl.fetch import Fetcher
from trawl.records import Outcome, Record
from trawl.settings import Settings

RUN_ID = "run-test-1"


class Harness:
    """Runs sources with a real Fetcher; records and outcomes pile up across runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[Record] = []
        self.outcomes: list[Outcome] = []
        self.stats = SourceStats()

    async def _emit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    async def run(
        self,
        source: HtmlSource | ApiSource,
        settings: Settings | None = None,
        validators: dict[str, tuple[str | None, str | None]] | None = None,
    ) -> list[Record]:
        """Consume the source's records; exceptions from ``fetch()`` propagate, outcomes so far stay."""
        s = settings or self.settings
        async with Fetcher(s) as fetcher:
            ctx = SourceContext(RUN_ID, s, fetcher, self._emit, self.stats, validators=validators or {})
            async for record in connector_for(source, ctx).fetch():
                self.records.append(record)
        return self.records

    def outcome_kinds(self) -> Counter[str]:
        return Counter(o.outcome.value for o in self.outcomes)

    def outcome_urls(self) -> Counter[str]:
        return Counter(o.url for o in self.outcomes)


@pytest.fixture
def harness(settings: Settings) -> Harness:
    return Harness(settings)
