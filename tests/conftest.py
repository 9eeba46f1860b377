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


def write_test_media(folder) -> None:
    """red.jpg (64x48), blue.png (40x80) and clip.mp4 (6 grey frames, 64x48) in folder."""
    import av
    import numpy as np
    from PIL import Image

    Image.new("RGB", (64, 48), (220, 30, 30)).save(folder / "red.jpg")
    Image.new("RGB", (40, 80), (30, 30, 220)).save(folder / "blue.png")
    with av.open(str(folder / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def finished_run(process, log_path, name: str, timeout: float) -> str:
    """The log of a run started in the background, once it exited 0 (killed, and the test failed, after timeout)."""
    import subprocess

    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = "timeout"
    with open(log_path) as f:
        log = f.read()
    assert returncode == 0, f"{name} failed ({returncode}):\n{log[-5000:]}"
    return log
