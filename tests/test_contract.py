"""The contract harness passes a well-behaved stateful callback and catches broken ones."""

import os
import socket

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from framework.testing import CHECKS, CallbackContract, ContractViolation, fresh_main_port


class InputStatistics(Callback):
    """A well-behaved stateful callback: the running mean of the training inputs, averaged over
    ranks, and a step counter, both checkpointed; it damps the gradients as steps accumulate so
    its state affects training."""

    def __init__(self) -> None:
        self.steps = 0
        self.mean = torch.zeros(())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        batch_mean = trainer.strategy.reduce(batch[0].float().mean(), reduce_op="mean")
        self.steps += 1
        self.mean = self.mean + (batch_mean.cpu() - self.mean) / self.steps
        pl_module.log("stats/mean", self.mean.item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / (1.0 + 0.01 * self.steps))

    def state_dict(self) -> dict:
        return {"steps": self.steps, "mean": self.mean}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = state_dict["steps"]
        self.mean = state_dict["mean"]


class ForgetfulStatistics(InputStatistics):
    """Broken: keeps state but never saves it, so a resumed run starts its counter from zero."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class RankLocalStatistics(InputStatistics):
    """Broken: averages only its own rank's inputs, so the ranks' states drift apart."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        self.mean = self.mean + (batch[0].float().mean() - self.mean) / self.steps


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_contract_passes_a_correct_callback(check, tmp_path):
    CallbackContract(InputStatistics, max_epochs=3, resume_epoch=1).check(check, tmp_path)


@pytest.mark.slow
def test_contract_catches_state_missing_from_checkpoint(tmp_path):
    with pytest.raises(ContractViolation, match="resume: .*differs"):
        CallbackContract(ForgetfulStatistics, max_epochs=3, resume_epoch=1).check("resume", tmp_path)


@pytest.mark.slow
def test_contract_catches_state_that_differs_across_ranks(tmp_path):
    with pytest.raises(ContractViolation, match="ddp: state differs between rank 0 and rank 1 at callback"):
        CallbackContract(RankLocalStatistics, max_epochs=2).check("ddp", tmp_path)


def test_contract_rejects_an_unknown_check(tmp_path):
    with pytest.raises(ValueError, match="unknown contract check 'ddpp'"):
        CallbackContract(InputStatistics).check("ddpp", tmp_path)


@pytest.mark.parametrize("before", [None, "29500"])
def test_fresh_main_port_sets_a_free_port_and_restores_the_environment(monkeypatch, before):
    """Each DDP check gets a port of its own instead of the one a previous ``ddp_spawn`` left in
    ``MASTER_PORT``, and the variable is as before afterwards."""
    if before is None:
        monkeypatch.delenv("MASTER_PORT", raising=False)
    else:
        monkeypatch.setenv("MASTER_PORT", before)
    with fresh_main_port():
        inside = os.environ["MASTER_PORT"]
        with socket.socket() as probe:
            probe.bind(("", int(inside)))  # free: binding it succeeds
    assert os.environ.get("MASTER_PORT") == before
