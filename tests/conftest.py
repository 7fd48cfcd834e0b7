"""Every test logs to W&B offline and quietly; nothing reaches the network."""

import os

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
