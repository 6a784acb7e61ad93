import pytest

import train


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of start-encoder evaluations (train.py keeps them under ~/.cache/dream):
    a test never reuses what another run left there. Child processes inherit it through $DREAM_CACHE."""
    folder = str(tmp_path_factory.mktemp("cache"))
    monkeypatch.setattr(train, "CACHE", folder)
    monkeypatch.setenv("DREAM_CACHE", folder)
