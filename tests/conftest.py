import pytest

from engine_utils import single_thread


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    with single_thread():
        yield
