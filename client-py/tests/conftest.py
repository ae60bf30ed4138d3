"""Fixtures: a real dualpath gateway process on ephemeral ports with a temporary store."""

import pytest

from harness import (  # noqa: F401 (re-exported to the tests)
    BLOCK_BYTES,
    BLOCKS,
    LAYER_BYTES,
    LAYERS,
    SEED,
    Gateway,
    synthetic_block,
    synthetic_key,
)


@pytest.fixture
def gateway(tmp_path):
    instance = Gateway(tmp_path)
    yield instance
    instance.stop()


SECRET = "python-test-cluster-secret-0123456789"


@pytest.fixture
def secure_gateway(tmp_path):
    """A gateway that requires clients to prove SECRET."""
    instance = Gateway(tmp_path, secret=SECRET)
    yield instance
    instance.stop()
