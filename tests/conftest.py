import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

ALLOWED_SKIPS_ENV = "MONAI_GRADICON_ALLOWED_SKIPS"
"""When set (``.ci/run`` sets it), a regular expression: every skipped test whose reason does not match it fails
the run. The reference implementation, scipy and ``../shared/data`` are declared test inputs, so a skip for want of
them means a broken install, not an optional feature."""

_SKIPPED: list[tuple[str, str]] = []


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip("../shared/data is not present")
    return path


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    pattern = os.environ.get(ALLOWED_SKIPS_ENV)
    if pattern is None:
        return
    allowed = re.compile(pattern)
    unexpected = [(node, reason) for node, reason in _SKIPPED if not allowed.search(reason)]
    if unexpected:
        writer = session.config.get_terminal_writer()
        writer.line("")
        writer.line(f"{len(unexpected)} test(s) skipped for a reason {ALLOWED_SKIPS_ENV}={pattern!r} does not allow:",
                    red=True)
        for node, reason in unexpected:
            writer.line(f"  {node}: {reason}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
