"""DiracNets: the Dirac convolution (identity at b = 0, one folded convolution), the layouts, the
signal across depth at initialisation against a plain net and a ResNet, and the configs."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from callbacks.activations import ActivationNorms
from framework.cli import FrameworkCLI, main
from framework.data import DigitsDataModule
from framework.errors import UserInputError
from framework.models import WideResNet
from framework.models.dirac import DiracConv2d, DiracNet, PlainNet
from framework.tasks import ClassificationTask
from framework.testing.smoke import check_architecture
from helpers import MemoryLogger

REPO = Path(__file__).resolve().parents[1]

ARCHITECTURES = {
    "dirac_16_1_digits": (lambda: DiracNet(16, 1, num_classes=10, in_channels=1), (4, 1, 8, 8), 10),
    "plain_16_1_digits": (lambda: PlainNet(16, 1, num_classes=10, in_channels=1), (4, 1, 8, 8), 10),
    "dirac_10_2_cifar": (lambda: DiracNet(10, 2, num_classes=100, in_channels=3), (2, 3, 32, 32), 100),
    "dirac_18_0.25_imagenet_layout": (lambda: DiracNet(18, 0.25, num_classes=7, in_channels=3, layout="imagenet"), (2, 3, 32, 32), 7),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_smoke(name, tmp_path):
    factory, shape, num_classes = ARCHITECTURES[name]
    check_architecture(factory, torch.randn(shape), (shape[0], num_classes), tmp_path)


@pytest.mark.parametrize(("in_channels", "out_channels"), [(6, 6), (3, 6), (6, 3)])
def test_dirac_conv_with_b_zero_is_the_identity(in_channels, out_channels):
    conv = DiracConv2d(in_channels, out_channels, kernel_size=3, alpha=1.0, beta=0.0)
    x = torch.randn(2, in_channels, 5, 7)
    if in_channels == out_channels:
        expected = x
    elif out_channels > in_channels:  # each input copied to out/in outputs
        expected = x.repeat(1, out_channels // in_channels, 1, 1)
    else:  # in/out inputs summed into each output
        expected = x.view(2, in_channels // out_channels, out_channels, 5, 7).sum(dim=1)
    torch.testing.assert_close(conv(x), expected)


def test_dirac_conv_starts_at_a_1_b_01_and_folds_into_one_convolution(monkeypatch):
    torch.manual_seed(0)
    conv = DiracConv2d(4, 4, kernel_size=3)
    assert torch.equal(conv.alpha.detach(), torch.ones(4)) and torch.allclose(conv.beta.detach(), torch.full((4,), 0.1))
    with torch.no_grad():
        conv.alpha.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        conv.beta.copy_(torch.tensor([0.1, 0.3, 2.0, 0.0]))
    norms = conv.weight.detach().flatten(1).norm(dim=1)  # one norm per output filter over in x kh x kw
    identity = torch.zeros(4, 4, 3, 3)
    identity[range(4), range(4), 1, 1] = 1.0
    expected = conv.alpha.detach().view(-1, 1, 1, 1) * identity + (conv.beta.detach() / norms).view(-1, 1, 1, 1) * conv.weight.detach()
    torch.testing.assert_close(conv.folded_weight().detach(), expected)

    calls = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: calls.append(args[1].shape) or conv2d(*args, **kwargs))
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(conv(x), conv2d(x, expected, padding=1))
    assert calls == [torch.Size([4, 4, 3, 3])]  # one convolution, with the folded weight


def test_layouts_and_parameter_count():
    model = DiracNet(28, 10, num_classes=10, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(convs) == 24 and not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)  # the paper's 36.5M
    per_group = {18: [4, 4, 4, 4], 34: [6, 8, 12, 10]}
    for depth, counts in per_group.items():
        imagenet = DiracNet(depth, 0.25, num_classes=1000, layout="imagenet")
        assert [sum(isinstance(m, DiracConv2d) for m in group.modules()) for group in imagenet.groups] == counts
        assert [group[-1].conv.weight.shape[0] for group in imagenet.groups] == [16, 32, 64, 128]  # 64k ... 512k
    plain = PlainNet(16, 1, in_channels=1)
    assert not any(isinstance(m, DiracConv2d) for m in plain.modules())
    x = plain.stem(torch.randn(1, 1, 32, 32))
    sizes = []
    for group in plain.groups:  # max-pooling between groups halves the resolution
        x = group(x)
        sizes.append(x.shape[-1])
    assert sizes == [32, 16, 8]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: DiracNet(depth=12), "6n+4"),
        (lambda: DiracNet(depth=50, layout="imagenet"), "depth (imagenet layout)=50"),
        (lambda: DiracNet(layout="vgg"), "layout='vgg'"),
        (lambda: DiracNet(widen_factor=0), "widen_factor=0"),
        (lambda: DiracConv2d(4, 4, kernel_size=2), "must be odd"),
        (lambda: DiracConv2d(4, 6), "divide"),
    ],
)
def test_bad_hyperparameters_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        factory()


def test_at_initialisation_the_signal_crosses_depth_in_a_diracnet_as_in_a_resnet_but_not_in_a_plain_net():
    """Logged by ActivationNorms on the first training step of depth-40 nets on 32x32 digits."""
    ratios = {}
    for name, net in (("dirac", DiracNet), ("plain", PlainNet), ("resnet", WideResNet)):
        torch.manual_seed(0)
        logger = MemoryLogger()
        trainer = L.Trainer(
            max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=logger, callbacks=[ActivationNorms()],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(ClassificationTask(net(40, 1, num_classes=10, in_channels=1)), datamodule=DigitsDataModule(image_size=32, batch_size=8, seed=0))
        (step, logged), *_ = [record for record in logger.records if "activations/norm/groups.0" in record[1]]
        assert step == 0
        forward = [logged[f"activations/norm/groups.{g}"] for g in range(3)]
        backward = [logged[f"activations/grad_norm/groups.{g}"] for g in range(3)]
        # BatchNorm keeps the forward scale in every net; the gradient reaching the first group
        # relative to the last shows whether the signal survives the depth.
        assert 0.5 < forward[-1] / forward[0] < 2.0, (name, forward)
        ratios[name] = backward[0] / backward[-1]
    assert ratios["dirac"] < 5 and ratios["resnet"] < 5, ratios  # measured about 2 and 3
    assert ratios["plain"] > 10 and ratios["plain"] > 3 * max(ratios["dirac"], ratios["resnet"]), ratios  # about 30


def parse_config(monkeypatch: pytest.MonkeyPatch, *args: str) -> FrameworkCLI:
    """The task and data module a config builds, without running anything."""
    monkeypatch.setattr("sys.argv", ["framework"])
    return FrameworkCLI(args=[*args, "--trainer.logger", "false"], run=False)


@pytest.mark.parametrize("experiment", ["dirac_digits", "dirac_plain_digits"])
def test_digits_experiments_train_without_weight_decay_on_a_b_and_batchnorm(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = parse_config(monkeypatch, "--config", str(REPO / "configs" / "experiment" / f"{experiment}.yaml"))
    assert isinstance(cli.datamodule, DigitsDataModule) and cli.datamodule.image_size == 32
    backbone = cli.model.backbone
    assert type(backbone) is (DiracNet if experiment == "dirac_digits" else PlainNet)
    decay, no_decay = cli.model.parameter_groups()
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in cli.model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    is_batchnorm = {name for name, module in cli.model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    expected = {name for name, _ in cli.model.named_parameters() if name.endswith((".alpha", ".beta")) or name.rpartition(".")[0] in is_batchnorm}
    assert exempt == expected and any(name.endswith(".alpha") for name in exempt) == (experiment == "dirac_digits")
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected


@pytest.mark.parametrize(
    ("name", "backbone"),
    [
        ("dirac28_10_cifar", {"depth": 28, "widen_factor": 10, "layout": "cifar", "num_classes": 10}),
        ("dirac18_imagenet", {"depth": 18, "widen_factor": 1, "layout": "imagenet", "num_classes": 1000}),
        ("dirac34_imagenet", {"depth": 34, "widen_factor": 1, "layout": "imagenet", "num_classes": 1000}),
    ],
)
def test_layout_configs_resolve_to_their_layout(name, backbone, monkeypatch, capsys):
    model = REPO / "configs" / "model" / f"{name}.yaml"
    monkeypatch.setattr("sys.argv", ["framework"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", str(model), "--data", "framework.data.DigitsDataModule", "--print_config"])
    assert exit_info.value.code == 0
    task = yaml.safe_load(capsys.readouterr().out)["model"]
    assert task["init_args"]["backbone"]["class_path"] == "framework.models.dirac.DiracNet"
    assert backbone.items() <= task["init_args"]["backbone"]["init_args"].items()
    assert task["init_args"]["no_weight_decay"] == ["*.alpha", "*.beta", "*bn*"]
