"""Shared test setup: Triton runs through its interpreter on machines without CUDA, and tests that need
../shared/reference skip with a clear reason when it is absent."""
import os
import pathlib

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_REFERENCE = pathlib.Path(os.environ.get("LITE3R_SHARED", REPO.parent / "shared")) / "reference"


@pytest.fixture(scope="session")
def shared_reference() -> pathlib.Path:
    """Path to ../shared/reference (manifests, weight recipe, parity fixtures); skips when absent."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"needs {SHARED_REFERENCE} (the shared reference fixtures); absent on this machine")
    return SHARED_REFERENCE


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
