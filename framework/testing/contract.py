"""The callback contract: what every callback of the project must survive.

A researcher adds our callbacks to runs that use DDP, resume from checkpoints, accumulate
gradients, clip them and train in bf16. :class:`CallbackContract` runs a callback through each of
these on a tiny model and fails with a message naming what broke:

``ddp``
    2 CPU processes (gloo, ``ddp_spawn``): the callback's state (``state_dict()`` and its
    attributes) and the model's weights end identical on both ranks.
``resume``
    a run stopped at an epoch boundary and resumed from its checkpoint ends with weights,
    optimizer state and callback state bitwise equal to those of the uninterrupted run.
``accumulation_and_clipping``
    with ``accumulate_grad_batches=2`` the optimizer steps once per two batches, and with
    ``gradient_clip_val`` the gradient norm the optimizer sees never exceeds the clip value.
``bf16``
    ``precision="bf16-mixed"`` on CPU trains, and weights and callback state stay finite.

Factories (of the callback, the task, the data module) must be picklable, i.e. module-level
functions or classes, or ``functools.partial`` of them, because ``ddp_spawn`` pickles them.
"""

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Number
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

CHECKS = ("ddp", "resume", "accumulation_and_clipping", "bf16")


class ContractViolation(AssertionError):
    """The callback broke one of the contract's checks; the message says which and where."""


@contextmanager
def fresh_main_port() -> Iterator[None]:
    """Run the block with ``MASTER_PORT`` set to a port free now, then restore it. Lightning's
    ``ddp_spawn`` writes the port it picks into this process's environment, so every later DDP
    run in the process (the next test) would reuse it, and fail to bind while the previous run's
    sockets on it are still closing."""
    previous = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = str(find_free_network_port())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MASTER_PORT", None)
        else:
            os.environ["MASTER_PORT"] = previous


def tiny_classification_task() -> L.LightningModule:
    """The default model of the contract: a 64-32-10 MLP classifier on 8x8 digits, plain SGD."""
    from functools import partial

    from framework.models import MLP
    from framework.tasks import ClassificationTask

    return ClassificationTask(MLP(64, 10, hidden=(32,)), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def tiny_digits() -> L.LightningDataModule:
    """The default data of the contract: the bundled digits, batches of 64."""
    from framework.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, seed=0)


def snapshot(value: Any, depth: int = 0) -> Any:
    """A detached copy of the comparable part of ``value``: tensors, numbers, strings and the
    containers of them; anything else (modules, trainers, functions) stands as its type name."""
    if depth > 8:
        return "<too deep>"
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (Number, str, bool, type(None))):
        return value
    if isinstance(value, Mapping):
        return {str(k): snapshot(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def callback_state(callback: Callback, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """What the contract compares of a callback: its ``state_dict()`` and its attributes (so a
    callback that forgets to put some state in ``state_dict`` is caught too)."""
    ignored = set(ignore)
    attributes = {name: value for name, value in vars(callback).items() if name not in ignored}
    return {"state_dict": snapshot(callback.state_dict()), "attributes": snapshot(attributes)}


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two snapshots first differ (bitwise for tensors), or None if they are equal."""
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"
        if not torch.equal(a, b) and not (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())):
            delta = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            return f"{where}: tensors differ (max abs difference {delta:.3g})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys differ ({sorted(a.keys() ^ b.keys())})"
        for key in a:
            found = first_difference(a[key], b[key], f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def non_finite(value: Any, path: str = "") -> str | None:
    """The first NaN or infinite number in a snapshot, or None."""
    if isinstance(value, torch.Tensor):
        return path or "<root>" if value.is_floating_point() and not torch.isfinite(value).all() else None
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "<root>"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class _Recorder(Callback):
    """Saves, at the end of fit, the callback's state, the weights and the optimizer state of
    this process to ``<directory>/rank<r>.pt``; counts optimizer steps and the gradient norms the
    optimizer is given (after clipping)."""

    def __init__(self, target: type, directory: Path, ignore: tuple[str, ...]) -> None:
        self.target = target
        self.directory = directory
        self.ignore = ignore
        self.grad_norms: list[float] = []
        self.optimizer_steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        clip = pl_module.configure_gradient_clipping

        def clip_and_record(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            clip(optimizer, *args, **kwargs)
            grads = [p.grad.detach().float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0)

        # Lightning clips through this hook right before optimizer.step, after every callback hook.
        pl_module.configure_gradient_clipping = clip_and_record  # type: ignore[method-assign]
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = next(c for c in trainer.callbacks if type(c) is self.target)
        record = {
            "callback": callback_state(callback, self.ignore),
            "weights": snapshot(pl_module.state_dict()),
            "optimizer": snapshot(trainer.optimizers[0].state_dict()),
            "global_step": trainer.global_step,
            "grad_norms": self.grad_norms,
            "optimizer_steps": self.optimizer_steps,
            "num_training_batches": trainer.num_training_batches,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.directory / f"rank{trainer.global_rank}.pt")


@dataclass
class CallbackContract:
    """Runs a callback through the contract's checks (see the module docstring).

    Args:
        callback_factory: builds the callback under test (picklable).
        task_factory: builds the LightningModule; default a tiny MLP on digits.
        datamodule_factory: builds the data; default the bundled digits.
        max_epochs: length of every run.
        resume_epoch: the ``resume`` check stops after this many epochs and resumes.
        clip_value: gradient-norm clip of the ``accumulation_and_clipping`` check; small so that
            clipping really acts.
        ignore_attributes: callback attributes not compared (e.g. wall-clock timings).
        wandb: log to an offline W&B run (exercising the callback's W&B code), else no logger.
        seed: seeds every run.
    """

    callback_factory: Callable[[], Callback]
    task_factory: Callable[[], L.LightningModule] = tiny_classification_task
    datamodule_factory: Callable[[], L.LightningDataModule] = tiny_digits
    max_epochs: int = 4
    resume_epoch: int = 2
    clip_value: float = 0.05
    ignore_attributes: tuple[str, ...] = field(default_factory=tuple)
    wandb: bool = True
    seed: int = 0

    def check(self, name: str, directory: str | Path) -> None:
        """Run one check by name (one of ``CHECKS``), working in ``directory``."""
        if name not in CHECKS:
            raise ValueError(f"unknown contract check {name!r}; choose one of {list(CHECKS)}")
        getattr(self, f"check_{name}")(Path(directory))

    def check_all(self, directory: str | Path) -> None:
        for name in CHECKS:
            self.check(name, Path(directory) / name)

    def _fit(self, directory: Path, ckpt_path: str | None = None, callbacks: Iterable[Callback] = (), **trainer_kwargs: Any) -> dict[str, Any]:
        """One fit in ``directory``; returns rank 0's record."""
        L.seed_everything(self.seed, verbose=False)
        callback = self.callback_factory()
        recorder = _Recorder(type(callback), directory / "records", tuple(self.ignore_attributes))
        logger = WandbLogger(save_dir=str(directory), offline=True, project="contract") if self.wandb else False
        settings = dict(
            accelerator="cpu",
            devices=1,
            max_epochs=self.max_epochs,
            deterministic=True,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(directory),
        )
        settings.update(trainer_kwargs)
        trainer = L.Trainer(callbacks=[callback, recorder, *callbacks], **settings)
        trainer.fit(self.task_factory(), datamodule=self.datamodule_factory(), ckpt_path=ckpt_path)
        if self.wandb and logger._experiment is not None:  # under ddp_spawn the run lived in a child
            logger._experiment.finish()
        return torch.load(directory / "records" / "rank0.pt", weights_only=False)

    def check_ddp(self, directory: Path) -> None:
        with fresh_main_port():
            self._fit(directory, devices=2, strategy="ddp_spawn")
        ranks = [torch.load(directory / "records" / f"rank{r}.pt", weights_only=False) for r in range(2)]
        for part in ("callback", "weights", "optimizer", "global_step"):
            found = first_difference(ranks[0][part], ranks[1][part], part)
            if found:
                raise ContractViolation(f"ddp: state differs between rank 0 and rank 1 at {found}")

    def check_resume(self, directory: Path) -> None:
        if not 0 < self.resume_epoch < self.max_epochs:
            raise ValueError(f"resume_epoch={self.resume_epoch} must be between 0 and max_epochs={self.max_epochs}")
        saver = ModelCheckpoint(dirpath=directory / "checkpoints", filename="{epoch}", save_top_k=-1)
        uninterrupted = self._fit(directory / "uninterrupted", callbacks=[saver], enable_checkpointing=True)
        checkpoint = directory / "checkpoints" / f"epoch={self.resume_epoch - 1}.ckpt"
        if not checkpoint.is_file():
            raise ContractViolation(f"resume: no checkpoint was written at the end of epoch {self.resume_epoch - 1} ({checkpoint})")
        resumed = self._fit(directory / "resumed", ckpt_path=str(checkpoint), enable_checkpointing=True)
        for part in ("global_step", "weights", "optimizer", "callback"):
            found = first_difference(uninterrupted[part], resumed[part], part)
            if found:
                raise ContractViolation(f"resume: the resumed run differs from the uninterrupted one at {found}")

    def check_accumulation_and_clipping(self, directory: Path) -> None:
        record = self._fit(directory, accumulate_grad_batches=2, gradient_clip_val=self.clip_value)
        expected_steps = self.max_epochs * math.ceil(record["num_training_batches"] / 2)
        norms = record["grad_norms"]
        if record["global_step"] != expected_steps or record["optimizer_steps"] != expected_steps:
            raise ContractViolation(
                f"accumulation: expected {expected_steps} optimizer steps with accumulate_grad_batches=2, "
                f"got global_step={record['global_step']} and {record['optimizer_steps']} optimizer.step calls"
            )
        worst = max(norms)
        if worst > self.clip_value * (1 + 1e-3):
            raise ContractViolation(f"clipping: the optimizer saw a gradient norm {worst:.4g} above gradient_clip_val={self.clip_value}")
        if not any(n > self.clip_value * 0.99 for n in norms):
            raise ContractViolation(f"clipping: no step reached the clip value {self.clip_value}; choose a smaller clip_value to test clipping")
        for part in ("weights", "callback"):
            found = non_finite(record[part], part)
            if found:
                raise ContractViolation(f"accumulation/clipping: non-finite value at {found}")

    def check_bf16(self, directory: Path) -> None:
        record = self._fit(directory, precision="bf16-mixed")
        for part in ("weights", "callback"):
            found = non_finite(record[part], part)
            if found:
                raise ContractViolation(f"bf16: non-finite value at {found}")
