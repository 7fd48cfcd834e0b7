"""The SLURM template is valid bash and its srun command parses with the framework's CLI."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from framework.cli import main

TEMPLATE = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"


def test_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)


def test_srun_command_parses(monkeypatch, capsys):
    text = TEMPLATE.read_text().replace("\\\n", " ")
    command = re.search(r"^srun python -m framework (.*?)\"\$@\"", text, re.M).group(1)
    environment = {"CONFIG:-configs/experiment/wrn28_10_cifar10.yaml": "configs/experiment/wrn28_10_cifar10.yaml", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4"}
    for name, value in environment.items():
        command = command.replace("${" + name + "}", value)
    monkeypatch.chdir(TEMPLATE.parents[2])
    monkeypatch.setattr(sys, "argv", ["framework", *shlex.split(command), "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    # Lightning accepts devices as an int or a string of one.
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "4", "ddp")
