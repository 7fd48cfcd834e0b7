"""A PyTorch Lightning framework for research on how networks are parameterised, optimised,
pruned and understood: plain `nn.Module` architectures, LightningModule tasks, data modules and
a LightningCLI entry point (`python -m framework`)."""

__version__ = "0.1.0"
