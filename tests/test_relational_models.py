"""CoRelNet, the relation network and the concatenation MLP: the generic architecture check,
their relational properties, and CoRelNet learning same/different digits."""

import pytest
import torch
import torch.nn.functional as F

from framework.data.relational import SameDifferentDataModule
from framework.errors import UserInputError
from framework.models.relational import ConcatMLP, ContextNorm, CoRelNet, RelationNetwork
from framework.testing.smoke import check_architecture

FEATURES, CLASSES, BATCH = 12, 3, 5

RELATIONAL_MODELS = {
    "corelnet_two_objects": (lambda: CoRelNet(FEATURES, 2, CLASSES, embedding_size=6, encoder_hidden=(8,)), 2),
    "corelnet_context_norm": (lambda: CoRelNet(FEATURES, 4, CLASSES, embedding_size=6, context_norm=True), 4),
    "relation_network": (lambda: RelationNetwork(FEATURES, 3, CLASSES, embedding_size=6, relation_hidden=(8, 7)), 3),
    "concat_mlp": (lambda: ConcatMLP(FEATURES, 3, CLASSES, embedding_size=6, encoder_hidden=()), 3),
}
# Multiple choice: 4 candidates of 2 objects completing 2 context objects (match-to-sample
# layout, 2 + 4 * 2 = 10 input objects), or 3 candidates of 1 object completing 4 (7 inputs).
CHOICE_MODELS = {
    "corelnet_pairs": (lambda: CoRelNet(FEATURES, 4, 4, embedding_size=6, context_norm=True, num_candidates=4, candidate_size=2), 10, 4),
    "relation_network_single": (lambda: RelationNetwork(FEATURES, 5, 3, embedding_size=6, relation_hidden=(8,), num_candidates=3), 7, 3),
    "concat_mlp_pairs": (lambda: ConcatMLP(FEATURES, 4, 4, embedding_size=6, num_candidates=4, candidate_size=2), 10, 4),
}


@pytest.mark.parametrize("name", RELATIONAL_MODELS)
def test_relational_architecture_smoke(name, tmp_path):
    factory, objects = RELATIONAL_MODELS[name]
    check_architecture(factory, torch.randn(BATCH, objects, FEATURES), (BATCH, CLASSES), tmp_path)


@pytest.mark.parametrize("name", CHOICE_MODELS)
def test_multiple_choice_architecture_smoke(name, tmp_path):
    factory, inputs, candidates = CHOICE_MODELS[name]
    check_architecture(factory, torch.randn(BATCH, inputs, FEATURES), (BATCH, candidates), tmp_path)


@pytest.mark.parametrize("name", CHOICE_MODELS)
def test_each_candidate_is_scored_with_the_context_alone(name):
    """Permuting the candidates permutes the logits; a candidate's logit is the score of the
    context completed with it."""
    torch.manual_seed(0)
    factory, inputs, candidates = CHOICE_MODELS[name]
    model = factory().eval()
    size = model.candidate_size
    context = inputs - candidates * size
    x = torch.randn(BATCH, inputs, FEATURES)
    order = torch.randperm(candidates)
    blocks = x[:, context:].unflatten(1, (candidates, size))
    permuted = torch.cat([x[:, :context], blocks[:, order].flatten(1, 2)], dim=1)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model(permuted), logits[:, order])
        for k in range(candidates):
            completed = torch.cat([x[:, :context], blocks[:, k]], dim=1)
            torch.testing.assert_close(model.score(completed).squeeze(-1), logits[:, k])


def test_relation_matrix_is_the_row_softmax_of_embedding_similarities():
    torch.manual_seed(0)
    model = CoRelNet(FEATURES, 3, CLASSES, context_norm=True)
    x = torch.randn(BATCH, 3, FEATURES)
    with torch.no_grad():
        z = model.context_norm(model.embed(x))
        relations = model.relation_matrix(x)
        identical = model.relation_matrix(x[:, :1].expand(-1, 3, -1))
    torch.testing.assert_close(relations, (z @ z.transpose(1, 2)).softmax(dim=-1))
    torch.testing.assert_close(relations.sum(dim=-1), torch.ones(BATCH, 3))
    torch.testing.assert_close(identical, torch.full((BATCH, 3, 3), 1 / 3))  # all alike: no relation stands out


def test_corelnet_decoder_sees_only_the_relations():
    """Objects with the same pairwise similarities give the same output, whatever they are."""
    torch.manual_seed(0)
    model = CoRelNet(FEATURES, 2, CLASSES)
    model.encoder = torch.nn.Identity()
    x = torch.randn(BATCH, 2, FEATURES)
    rotation = torch.linalg.qr(torch.randn(FEATURES, FEATURES)).Q
    with torch.no_grad():
        torch.testing.assert_close(model(x @ rotation), model(x))


def test_context_norm_standardises_each_feature_over_the_objects():
    norm = ContextNorm(4)
    z = torch.randn(BATCH, 6, 4) * 3 + 2
    out = norm(z)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(BATCH, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1, unbiased=False), torch.ones(BATCH, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm(z * 5 - 7), out, atol=1e-4, rtol=0)  # blind to a shared scale and offset


def test_relation_network_is_invariant_to_the_order_of_objects():
    torch.manual_seed(0)
    model = RelationNetwork(FEATURES, 4, CLASSES)
    x = torch.randn(BATCH, 4, FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, [2, 0, 3, 1]]), model(x))
        assert not torch.allclose(ConcatMLP(FEATURES, 4, CLASSES)(x[:, [2, 0, 3, 1]]), ConcatMLP(FEATURES, 4, CLASSES)(x))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: CoRelNet(num_objects=2, context_norm=True), "context_norm=True needs num_objects >= 3"),
        (lambda: CoRelNet(num_objects=0), "num_objects=0"),
        (lambda: RelationNetwork(relation_hidden=()), "relation_hidden must name"),
        (lambda: ConcatMLP(embedding_size=0), "must be > 0"),
        (lambda: CoRelNet(num_objects=6, num_classes=2, num_candidates=4), "num_classes=2 must equal num_candidates=4"),
        (lambda: RelationNetwork(num_objects=2, num_classes=2, num_candidates=2, candidate_size=2), "candidate_size=2 must be < num_objects=2"),
        (lambda: ConcatMLP(num_candidates=-1), "num_candidates=-1"),
    ],
)
def test_bad_relational_hyperparameters_are_refused(factory, message):
    with pytest.raises(UserInputError, match=message):
        factory()


def test_wrong_number_of_objects_is_refused():
    with pytest.raises(ValueError, match=r"expected inputs \(N, 2, D\)"):
        CoRelNet(FEATURES, 2, CLASSES)(torch.randn(BATCH, 3, FEATURES))
    with pytest.raises(ValueError, match=r"expected inputs \(N, 9, D\)"):  # 5 context objects + 4 candidates
        CoRelNet(FEATURES, 6, 4, num_candidates=4)(torch.randn(BATCH, 6, FEATURES))


def accuracy(model: torch.nn.Module, loader) -> float:
    with torch.no_grad():
        correct = [(model(x).argmax(dim=-1) == y).float() for x, y in loader]
    return torch.cat(correct).mean().item()


def test_corelnet_learns_same_different_and_beats_chance_on_held_out_digits():
    torch.manual_seed(0)
    data = SameDifferentDataModule(train_size=4000, val_size=500, test_size=500)
    data.setup()
    model = CoRelNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert accuracy(model, data.val_dataloader()) > 0.9  # unseen images of the training digits
    assert accuracy(model, data.test_dataloader()) > 0.55  # digits never seen in training
