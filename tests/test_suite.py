"""The suite's own arrangement (tests/conftest.py) holds under the pytest that runs it."""

from __future__ import annotations

import pytest


def test_a_modules_tests_share_one_worker(request):
  # conftest groups each module's tests (but SPREAD_MODULES') for pytest-xdist's --dist
  # loadgroup, so that its module fixtures (trained runs, a scheduler's jobs) are built once and
  # its scheduler jobs never meet another test's. xdist marks a grouped test by an "@<group>"
  # suffix on its id; without it the tests go to any worker, silently. That happened twice: with
  # xdist's hook running before conftest's, and with pytest 9.2 (pyproject.toml).
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not run by pytest-xdist with --dist loadgroup (scripts/test.sh does)")
  assert request.node.nodeid.endswith("@test_suite"), request.node.nodeid
