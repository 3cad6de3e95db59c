"""Shared pytest options: ``slow`` tests (real embedded models) run only with ``--runslow`` or ``MSPECKV_SLOW=1``;
``gpu`` tests only where CUDA is available."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    run_slow = config.getoption("--runslow") or os.environ.get("MSPECKV_SLOW", "") not in ("", "0")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or MSPECKV_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
