import pytest

from runtime import LoadedModel, load_model


@pytest.fixture(scope="session")
def loaded(checkpoints) -> dict[str, LoadedModel]:
    """The tiny checkpoints, loaded: a real config and fingerprint per architecture."""
    return {arch: load_model(checkpoints[arch]) for arch in ("mamba1", "mamba2")}
