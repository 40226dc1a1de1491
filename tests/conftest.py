"""Fixtures several test modules share, and an offline environment for every test."""

import os

# Set before anything imports the hub client. The kit runs offline (BRIEF §2): no test may
# reach a model hub, and the hub client's telemetry thread has crashed a test process trying to.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from labkit.models import load_model  # noqa: E402


@pytest.fixture(scope="session")
def peaked_tiny(tmp_path_factory) -> str:
    """A folder holding the tiny model with its final norm scaled up: a peaked next-token
    distribution in which a newline is a common but not dominant first token, so a reward on
    newlines is learnable in a few PPO steps."""
    model, tok = load_model("tiny", dtype="float32")
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)
    path = tmp_path_factory.mktemp("peaked_tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
