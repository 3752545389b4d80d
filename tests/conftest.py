import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_utils import single_thread


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder shared by one module's tests, removed when the module ends: a tiny checkpoint is ~165 MB and
    the suite writes dozens (kept until the end of the run, they would fill a CI disk)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)
