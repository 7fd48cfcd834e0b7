"""Cross-check against NNGeometry 0.4 (an optional peer library, installed with ``--no-deps``):
the same float64 model and data, the exact Fisher (NNGeometry's ``FIM(variant="classif_logits")``),
for the Diagonal, KFAC, EKFAC and Dense representations, on an MLP and a small CNN.

Conventions compared (docs/curvature.md): NNGeometry scales KFAC's factors differently (A times
sqrt(K), G divided by sqrt(K), K its number of outputs, the product is the same), uses the same
KFC convolution convention (G averaged over output positions) and its ``PMatEKFAC`` keeps KFAC's
eigenvalues until ``update_diag`` re-estimates them in the eigenbasis."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.curvature import EKFAC, KFAC, fisher
from callbacks.curvature.layers import channel_major_index
from framework.models import MLP, SmallCNN

pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag, PMatEKFAC, PMatKFAC  # noqa: E402

CLASSES = 3


@pytest.fixture(autouse=True)
def float64_default():
    """NNGeometry builds some matrices (and the eps guarding its Cholesky factor) in the default
    dtype, so float64 agreement needs float64 as the default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def task(name: str) -> tuple[torch.nn.Module, DataLoader]:
    torch.manual_seed(0)
    if name == "mlp":
        model, inputs = MLP(4, CLASSES, hidden=(5,), activation="tanh"), torch.randn(10, 4)
    else:
        model, inputs = SmallCNN(1, CLASSES, channels=(2, 3)), torch.randn(10, 1, 4, 4)
    dataset = TensorDataset(inputs, torch.randint(0, CLASSES, (10,)))
    return model.double().eval(), DataLoader(dataset, batch_size=4)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_dense_and_diagonal_equal_nngeometry(model_name):
    model, loader = task(model_name)
    theirs = FIM(model, loader, PMatDense, variant="classif_logits").to_torch()
    torch.testing.assert_close(fisher(model, loader, "dense").to_dense(), theirs)
    theirs_diagonal = FIM(model, loader, PMatDiag, variant="classif_logits").to_torch()
    torch.testing.assert_close(fisher(model, loader, "diagonal").to_dense(), theirs_diagonal)
    torch.testing.assert_close(theirs_diagonal, torch.diag(theirs.diagonal()))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kfac_equals_nngeometry_up_to_the_factor_scaling(model_name):
    model, loader = task(model_name)
    theirs = FIM(model, loader, PMatKFAC, variant="classif_logits")
    ours = fisher(model, loader, "kfac")
    assert isinstance(ours, KFAC)
    torch.testing.assert_close(ours.to_dense(), theirs.to_torch())
    outputs = CLASSES - 1  # NNGeometry's exact classification Fisher has C - 1 outputs
    for name, (a, g) in theirs.data.items():
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Conv2d):  # NNGeometry's patches are channel-major (F.unfold), ours kernel-major
            index = channel_major_index(module.in_channels, module.kernel_size, module.bias is not None)
            a = a[index][:, index]
        torch.testing.assert_close(ours.blocks[name].a * outputs**0.5, a)
        torch.testing.assert_close(ours.blocks[name].g / outputs**0.5, g)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_ekfac_equals_nngeometry_after_its_update_diag(model_name):
    model, loader = task(model_name)
    theirs = FIM(model, loader, PMatEKFAC, variant="classif_logits")
    kfac = fisher(model, loader, "kfac")
    torch.testing.assert_close(theirs.to_torch(), kfac.to_dense())  # its constructor keeps KFAC's eigenvalues
    theirs.update_diag(loader)
    ours = fisher(model, loader, "ekfac")
    assert isinstance(ours, EKFAC)
    torch.testing.assert_close(ours.to_dense(), theirs.to_torch())
    assert not torch.allclose(ours.to_dense(), kfac.to_dense())
    for name, diagonal in theirs.data[1].items():
        torch.testing.assert_close(ours.blocks[name].scaling.flatten(), diagonal.flatten())
