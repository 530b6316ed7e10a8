"""Fixtures every tier may use: the namespace test bed's ``bed_factory``, and the hook that keeps a failing test's
pod scenario logs (tests.harness.scenario) under build/test-logs/<test>/ and names the place in the report."""

import sys
from collections.abc import Generator, Iterator

import pytest

from tests.harness import scenario
from tests.harness.netbed import Bed, BedFactory, Sidecar, VmStandIn


@pytest.fixture
def bed_factory() -> Iterator[BedFactory]:
    """Make beds, sidecars and stand-ins; everything is cleaned up in reverse order, logs printed on failure."""
    made: list[Bed | Sidecar | VmStandIn] = []
    try:
        yield BedFactory(made)
    finally:
        for item in reversed(made):
            if isinstance(item, Sidecar) and item.log():
                sys.stderr.write(f"--- sidecar log (pv{item.bed.ident}) ---\n{item.log()}\n")
            item.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    """A test that fails while pod scenarios are up keeps their logs where a person finds them."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for kept in scenario.keep_live_logs(item.name):
            report.sections.append(("podvm logs", f"logs of the failing scenario kept in {kept}"))
