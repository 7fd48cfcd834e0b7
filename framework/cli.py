"""The command line: ``python -m framework {fit,validate,test,predict} --config FILE``.

LightningCLI with omegaconf parsing, plus what a researcher expects of it here: one-line errors
for bad keys, values and files; the resolved config saved beside the checkpoints and into the W&B
run; a resumed run (``--ckpt_path``) that continues the same W&B run.
"""

import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from framework.errors import UserInputError
from framework.tasks.base import CHECKPOINT_KEY

CKPT_SHORTCUTS = ("last", "best", "hpc", "registry")


def one_line(message: str) -> str:
    """Squeeze a (possibly nested, multi-line) parser message into one line."""
    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip(" -")]
    text = " | ".join(dict.fromkeys(lines))
    return re.sub(r"\s+", " ", text)


class OneLineErrorParser(LightningArgumentParser):
    """Prints a parse error as a single line (no usage block, no stack trace) naming the full
    key and the allowed keys or values, and exits with 2."""

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        if os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        sys.stderr.write(f"error: {explain(one_line(message), self, sys.argv[1:])}\n")
        sys.exit(2)


def explain(message: str, parser: LightningArgumentParser, argv: list[str]) -> str:
    """Add to a jsonargparse message what it leaves out: the full dotted key, and the keys a
    class node or the parser accepts."""
    config = merged_config(argv)
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown:
        for path, class_path in locate(config, unknown.group(1)):
            allowed = init_parameters(class_path)
            if allowed is not None:
                return f"{path}: unknown key for {class_path}; allowed keys: {', '.join(allowed)}"
    stray = re.search(r"(?:Subcommand '(\w+)' )?does not accept option '([^']+)'|[Uu]nrecognized arguments: --?(\S+)", message)
    if stray:
        subcommand, key = stray.group(1), (stray.group(2) or stray.group(3)).split("=")[0]
        if subcommand and parser._subcommands_action is not None:
            parser = parser._subcommands_action._name_parser_map[subcommand]
        known = {action.dest for action in parser._actions if action.dest and not action.dest.endswith(".help")} - {"help"}
        parts = key.split(".")
        group = next((".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1) if any(k.startswith(".".join(parts[:n]) + ".") for k in known)), "")
        allowed = sorted(k[len(group) + 1 :] if group else k for k in known if (k.startswith(group + ".") if group else "." not in k))
        return f"{key}: unknown key; allowed keys{' under ' + group if group else ''}: {', '.join(allowed)}"
    named = re.match(r'Parser key "([^"]+)": (.*)', message)
    if named:
        paths = [path for path, _ in locate(config, named.group(1).rpartition(".")[2])] or [named.group(1)]
        message = f"{paths[0]}: {named.group(2)}"
    return re.sub(r"<class '([\w.]+)'>", r"\1", message).replace(": | ", ": ")


def merged_config(argv: list[str]) -> dict[str, Any]:
    """The config as the user wrote it: ``--config`` files (with file-valued nodes loaded
    relative to their file) merged, then ``--a.b.c value`` overrides. Only used to locate keys
    in error messages, so it is forgiving."""
    config: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        if not has_value and arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        if key == "config" and value:
            deep_update(config, load_yaml_tree(Path(value)))
        elif key:
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else {}
            node[leaf] = value
        i += 1
    return config


def load_yaml_tree(path: Path) -> Any:
    """A YAML file with every string value that names an existing YAML file (relative to the
    file) replaced by that file's content, as jsonargparse resolves them."""
    import yaml

    def resolve(value: Any, directory: Path) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, directory) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, directory) for v in value]
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (directory / value).is_file():
            return load_yaml_tree(directory / value)
        return value

    try:
        return resolve(yaml.safe_load(path.read_text()), path.parent)
    except (OSError, yaml.YAMLError):
        return {}


def deep_update(base: dict[str, Any], update: Any) -> None:
    if not isinstance(update, dict):
        return
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


def locate(config: Any, key: str, path: str = "", owner: str | None = None) -> list[tuple[str, str | None]]:
    """Dotted paths where ``key`` occurs in ``config``, each with the class_path of the class
    node whose ``init_args`` hold it (or None); those inside a class node first."""
    found: list[tuple[str, str | None]] = []
    if isinstance(config, dict):
        for name, value in config.items():
            child = f"{path}.{name}" if path else str(name)
            if name == key:
                found.append((child, owner))
            found += locate(value, key, child, config.get("class_path") if name == "init_args" else None)
    elif isinstance(config, list):
        for index, value in enumerate(config):
            found += locate(value, key, f"{path}[{index}]")
    return sorted(found, key=lambda item: item[1] is None) if not path else found


def init_parameters(class_path: str | None) -> list[str] | None:
    """Names of the ``__init__`` parameters of the class at ``class_path``, or None."""
    import importlib
    import inspect

    if not class_path or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Writes the resolved config as ``config.yaml`` beside the checkpoints and into the config
    of every W&B run. An existing, different ``config.yaml`` (a resumed run with changed
    settings) is kept; the new one is written as ``config-<n>.yaml``."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": self.config.as_dict()})
        if not trainer.is_global_zero:
            return
        text = self.parser.dump(self.config, skip_none=False)
        directory = self._config_directory(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        path, index = directory / "config.yaml", 0
        while path.exists() and path.read_text() != text:
            index += 1
            path = directory / f"config-{index}.yaml"
        path.write_text(text)

    @staticmethod
    def _config_directory(trainer: Trainer) -> Path:
        """The checkpoint directory (ModelCheckpoint resolves it only in its own setup, which
        runs after ours), else the trainer's log directory."""
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None:
            return Path(trainer.log_dir or trainer.default_root_dir)
        if checkpoint.dirpath is not None:
            return Path(checkpoint.dirpath)
        return Path(checkpoint._ModelCheckpoint__resolve_ckpt_dir(trainer))  # type: ignore[attr-defined]


class FrameworkCLI(LightningCLI):
    """LightningCLI for any task and data module of the framework (or of the user: any
    ``class_path``), configured from omegaconf-flavoured YAML."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        parser_kwargs = {"parser_mode": "omegaconf", "allow_abbrev": False, **kwargs.pop("parser_kwargs", {})}
        super().__init__(
            model_class=None,
            datamodule_class=None,
            save_config_callback=SaveConfigBesideCheckpoints,
            parser_class=OneLineErrorParser,
            parser_kwargs=parser_kwargs,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run the test loop on the best checkpoint (or the final weights if none).",
        )

    def before_fit(self) -> None:
        """Continue the W&B run recorded in the checkpoint a run resumes from."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path is None or ckpt_path in CKPT_SHORTCUTS:
            return
        if not Path(ckpt_path).is_file():
            raise UserInputError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        run_id = (checkpoint.get(CHECKPOINT_KEY) or {}).get("wandb_run_id")
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and run_id is not None:
                continue_wandb_run(logger, run_id)


    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            checkpoint = self.trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def continue_wandb_run(logger: WandbLogger, run_id: str) -> None:
    """Point a not yet started WandbLogger at an existing run id, unless the user chose one."""
    if logger._experiment is not None or logger._wandb_init.get("id") not in (None, run_id):
        return
    logger._wandb_init.update(id=run_id, resume="allow")
    logger._id = run_id


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m framework``."""
    try:
        FrameworkCLI(args=args)
    except Exception as error:  # a UserInputError may come wrapped by jsonargparse
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        sys.stderr.write(f"error: {one_line(str(cause))}\n")
        sys.exit(2)
