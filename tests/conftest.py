import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "phi3v", "assets")  # official config files


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """One tiny random checkpoint (official layout, real tokenizer) shared by every test that only reads it."""
    from phi3v.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_crops=4)


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from phi3v import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(tiny_checkpoint)
