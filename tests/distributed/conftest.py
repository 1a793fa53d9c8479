"""The distributed tests' rank pools (helpers.RankPool) live until this package's tests end."""

from __future__ import annotations

import pytest

from tests.distributed.helpers import close_pools


@pytest.fixture(scope="package", autouse=True)
def _rank_pools():
    yield
    close_pools()
