"""The empirical NTK against NNGeometry's (``GramMatrix``, ``FMatDense``) on the same models and
data, in float64.

NNGeometry's Gram matrix has layout (O, N, O, N) and no normalisation: ``G[a, i, b, j] = J_a(x_i)
. J_b(x_j)``, the sum over parameters. Ours is (N, N, O, O), so ``K = G.permute(1, 3, 0, 2)``; its
trace over outputs is our ``trace_reduction="sum"`` (``"mean"`` divides by O). NNGeometry centres
with ``TorchHooksJacobianBackend(centering=True)`` (``H G H`` on both example dimensions, as our
``centered=True``) and restricts to one layer with a ``LayerCollection``.
"""

import pytest
import torch
from test_linearization_ntk import _model_and_inputs
from torch.utils.data import DataLoader, TensorDataset

from callbacks.linearization import EmpiricalNTK, parameter_groups

nngeometry = pytest.importorskip("nngeometry")
from nngeometry.backend import TorchHooksJacobianBackend  # noqa: E402
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.object import FMatDense  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

IMPLEMENTATIONS = ["jacobian", "ntk_vector", "structured"]


@pytest.fixture(autouse=True)
def float64_by_default():
    """NNGeometry allocates its buffers (the kernel, the centring matrix) in the default dtype."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def nngeometry_kernel(model: torch.nn.Module, inputs: torch.Tensor, centered: bool = False, layer: str | None = None) -> torch.Tensor:
    """NNGeometry's NTK of ``model`` on ``inputs`` (in batches of 3, so it assembles blocks too),
    of all layers or of one, in our (N, N, O, O) layout."""
    layers = None
    if layer is not None:
        layers = LayerCollection()
        layers.add_layer_from_model(model, model.get_submodule(layer))
    backend = TorchHooksJacobianBackend(model, centering=centered, layer_collection=layers)
    gram = FMatDense(backend, examples=DataLoader(TensorDataset(inputs), batch_size=3)).to_torch()
    return gram.permute(1, 3, 0, 2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kernel_agrees_with_nngeometry_in_every_mode(model_name, implementation):
    model, inputs = _model_and_inputs(model_name)
    expected = nngeometry_kernel(model, inputs)
    assert expected.shape == (7, 7, 3, 3)
    kernel = lambda **options: EmpiricalNTK(implementation=implementation, chunk_size=4, **options)(model, inputs)
    torch.testing.assert_close(kernel(), expected)
    diagonal = torch.diagonal(expected, dim1=2, dim2=3)
    torch.testing.assert_close(kernel(mode="diagonal"), diagonal)
    torch.testing.assert_close(kernel(mode="trace", trace_reduction="sum"), diagonal.sum(-1))
    torch.testing.assert_close(kernel(mode="trace"), diagonal.sum(-1) / 3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_centred_and_per_layer_kernels_agree_with_nngeometry(model_name, implementation):
    model, inputs = _model_and_inputs(model_name)
    torch.testing.assert_close(
        EmpiricalNTK(centered=True, implementation=implementation)(model, inputs), nngeometry_kernel(model, inputs, centered=True)
    )
    kernels = EmpiricalNTK(implementation=implementation).layerwise(model, inputs)
    assert list(kernels) == list(parameter_groups(model)) and len(kernels) == 3
    for layer, kernel in kernels.items():
        torch.testing.assert_close(kernel, nngeometry_kernel(model, inputs, layer=layer))
