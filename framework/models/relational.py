"""Relational architectures over a set of objects, inputs (N, K, D) -> logits (N, C):
CoRelNet (Kerg et al. 2022) and two baselines, a relation network (Santoro et al. 2017) and an
MLP over the concatenated object embeddings.

Each model also answers multiple-choice problems (``num_candidates`` > 0), as in the relational
tasks of Webb et al. 2021 and Kerg et al. 2022: the inputs hold context objects followed by
``num_candidates`` candidates of ``candidate_size`` objects each; the model completes the
context with each candidate in turn, scores each completed set of ``num_objects`` objects with
one logit, and returns the logits over candidates (N, num_candidates)."""

from collections.abc import Sequence

import torch
from torch import nn

from framework.errors import UserInputError, check_positive


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers between consecutive ``widths``, with ReLU between them (none at the end)."""
    for width in widths:
        check_positive("layer width", width)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class ContextNorm(nn.Module):
    """Context normalisation (Webb et al. 2020): each embedding feature is standardised over the
    K objects of its example, then scaled and shifted by learned gamma and beta. It removes
    what the objects share, so relations are judged on the same scale for unseen objects."""

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mean, var = z.mean(dim=1, keepdim=True), z.var(dim=1, unbiased=False, keepdim=True)
        return (z - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class ObjectSetModel(nn.Module):
    """Base of the relational models: a shared object encoder, an MLP, applied to each of the K
    objects (N, K, D) -> (N, K, E); subclasses define :meth:`score` of a set of K objects.

    Without candidates the output is ``score(x)``, (N, C). With ``num_candidates`` = M > 0 the
    inputs are (N, K - s + M s, D): K - s context objects, then M candidates of s =
    ``candidate_size`` objects; each candidate completes the context to a set of K objects
    (:meth:`candidate_sets`), scored with one logit, and the output is (N, M).

    Args:
        input_size: D, features per object (64 for 8x8 digits).
        num_objects: K, the objects of a scored set (context and one candidate).
        num_classes: C, size of the output; with candidates it must equal ``num_candidates``.
        embedding_size: E.
        encoder_hidden: widths of the encoder's hidden layers.
        num_candidates: M, 0 for plain classification of the K objects.
        candidate_size: s, objects per candidate (1, or 2 for pairs in relational match-to-sample).
    """

    def __init__(
        self,
        input_size: int,
        num_objects: int,
        num_classes: int,
        embedding_size: int,
        encoder_hidden: Sequence[int],
        num_candidates: int = 0,
        candidate_size: int = 1,
    ) -> None:
        super().__init__()
        check_positive("num_objects", num_objects)
        check_positive("num_classes", num_classes)
        check_positive("num_candidates", num_candidates, allow_zero=True)
        check_positive("candidate_size", candidate_size)
        if num_candidates and num_classes != num_candidates:
            raise UserInputError(f"num_classes={num_classes} must equal num_candidates={num_candidates}: the output is one logit per candidate")
        if num_candidates and candidate_size >= num_objects:
            raise UserInputError(f"candidate_size={candidate_size} must be < num_objects={num_objects} (a context object at least)")
        self.num_objects = num_objects
        self.num_candidates = num_candidates
        self.candidate_size = candidate_size
        self.output_size = 1 if num_candidates else num_classes
        self.encoder = mlp([input_size, *encoder_hidden, embedding_size])

    @property
    def num_inputs(self) -> int:
        """Objects per input example: K, or the context plus every candidate."""
        if not self.num_candidates:
            return self.num_objects
        return self.num_objects + (self.num_candidates - 1) * self.candidate_size

    def candidate_sets(self, x: torch.Tensor) -> torch.Tensor:
        """The context completed with each candidate in turn, (N * M, K, D), example-major."""
        context_size = self.num_objects - self.candidate_size
        context, candidates = x[:, :context_size], x[:, context_size:]
        candidates = candidates.unflatten(1, (self.num_candidates, self.candidate_size))
        expanded = context[:, None].expand(-1, self.num_candidates, -1, -1)
        return torch.cat([expanded, candidates], dim=2).flatten(0, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The object embeddings (N, K, E) of a set of objects (N, K, D)."""
        return self.encoder(x)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The output for sets of K objects (B, K, D): (B, C), or (B, 1) with candidates."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_inputs:
            raise ValueError(f"expected inputs (N, {self.num_inputs}, D), got {tuple(x.shape)}")
        if not self.num_candidates:
            return self.score(x)
        return self.score(self.candidate_sets(x)).view(x.shape[0], self.num_candidates)


class CoRelNet(ObjectSetModel):
    """CoRelNet (Kerg et al. 2022): encode each object, context-normalise the embeddings Z, form
    the relation matrix ``R = softmax(Z Z^T)`` (row-wise, K x K: only similarities between
    objects reach the decoder, never the objects themselves), and decode the flattened R with an
    MLP. This bias towards relations is what lets it transfer to unseen objects.

    Args:
        context_norm: apply :class:`ContextNorm` to the embeddings; needs at least 3 objects
            (over 2 it leaves only the sign of their difference, so every pair gets the same
            relation matrix).
        decoder_hidden: widths of the decoder's hidden layers.
        (the rest as in :class:`ObjectSetModel`)
    """

    def __init__(
        self,
        input_size: int = 64,
        num_objects: int = 2,
        num_classes: int = 2,
        embedding_size: int = 32,
        encoder_hidden: Sequence[int] = (64,),
        decoder_hidden: Sequence[int] = (64,),
        context_norm: bool = False,
        num_candidates: int = 0,
        candidate_size: int = 1,
    ) -> None:
        super().__init__(input_size, num_objects, num_classes, embedding_size, encoder_hidden, num_candidates, candidate_size)
        if context_norm and num_objects < 3:
            raise UserInputError(f"context_norm=True needs num_objects >= 3, got {num_objects}: over 2 objects it maps every pair to the same relation matrix")
        self.context_norm = ContextNorm(embedding_size) if context_norm else nn.Identity()
        self.decoder = mlp([num_objects * num_objects, *decoder_hidden, self.output_size])

    def relation_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """R = softmax(Z Z^T) over the last axis, (N, K, K), of sets of objects (N, K, D)."""
        z = self.context_norm(self.embed(x))
        return (z @ z.transpose(1, 2)).softmax(dim=-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.relation_matrix(x).flatten(1))


class RelationNetwork(ObjectSetModel):
    """Relation network (Santoro et al. 2017): ``f(sum_{i,j} g([z_i, z_j]))`` over all ordered
    pairs of object embeddings, g and f MLPs.

    Args:
        relation_hidden: widths of g's layers (its last is the relation size).
        output_hidden: widths of f's hidden layers.
        (the rest as in :class:`ObjectSetModel`)
    """

    def __init__(
        self,
        input_size: int = 64,
        num_objects: int = 2,
        num_classes: int = 2,
        embedding_size: int = 32,
        encoder_hidden: Sequence[int] = (64,),
        relation_hidden: Sequence[int] = (64, 64),
        output_hidden: Sequence[int] = (64,),
        num_candidates: int = 0,
        candidate_size: int = 1,
    ) -> None:
        super().__init__(input_size, num_objects, num_classes, embedding_size, encoder_hidden, num_candidates, candidate_size)
        if not relation_hidden:
            raise UserInputError("relation_hidden must name at least one layer (its last width is the relation size)")
        self.relation = mlp([2 * embedding_size, *relation_hidden])
        self.output = mlp([relation_hidden[-1], *output_hidden, self.output_size])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        k = z.shape[1]
        pairs = torch.cat([z[:, :, None].expand(-1, k, k, -1), z[:, None].expand(-1, k, k, -1)], dim=-1)
        return self.output(self.relation(pairs).sum(dim=(1, 2)))


class ConcatMLP(ObjectSetModel):
    """The baseline without a relational bias: an MLP over the concatenated object embeddings.

    Args:
        decoder_hidden: widths of the MLP's hidden layers.
        (the rest as in :class:`ObjectSetModel`)
    """

    def __init__(
        self,
        input_size: int = 64,
        num_objects: int = 2,
        num_classes: int = 2,
        embedding_size: int = 32,
        encoder_hidden: Sequence[int] = (64,),
        decoder_hidden: Sequence[int] = (64,),
        num_candidates: int = 0,
        candidate_size: int = 1,
    ) -> None:
        super().__init__(input_size, num_objects, num_classes, embedding_size, encoder_hidden, num_candidates, candidate_size)
        self.decoder = mlp([num_objects * embedding_size, *decoder_hidden, self.output_size])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(x).flatten(1))
