"""Every test logs to W&B offline and quietly; nothing reaches the network."""

import os

import pytest
import torch

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"


@pytest.fixture(autouse=True)
def finish_wandb_run():
    """Finish a W&B run a test left open: a later ``wandb.init`` would otherwise return that run
    (wandb's default outside notebooks) and log into another test's directory."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.run.finish()


@pytest.fixture
def single_threaded_torch():
    """One torch thread, for modules of tiny problems (``pytestmark = pytest.mark.usefixtures(...)``):
    on a shared machine torch's threads waiting for each other cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
