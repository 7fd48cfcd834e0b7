"""Small-scale study of CoRelNet against its baselines in and out of distribution, on CPU.

Four relational tasks built from the bundled 8x8 digits (``framework.data.relational``):
same/different (digits 7-9 held out), relational match-to-sample, distribution-of-3 and
identity rules (digits 6-9 held out). On each, CoRelNet (Kerg et al. 2022; context
normalisation when a scored set has 3 objects or more), a relation network (Santoro et al. 2017)
and an MLP over the concatenated embeddings, all with the same object encoder (64-64-32), are
trained with Adam for the same number of steps. Reported: accuracy on unseen images of the
training digits (in distribution, the ``val`` split) and on the held-out digits (out of
distribution, ``test``), mean and range over seeds. Kerg et al. 2022 report CoRelNet
generalising out of distribution where the baselines do not.

Figure: ``docs/figures/relational_ood.png`` (every task in ``--output``); numbers to stdout and
``--output`` (JSON).

    python scripts/studies/relational.py                     # 4 tasks x 3 models x 2 seeds
    python scripts/studies/relational.py --tasks identity_rules   # rerun one task, keep the others
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from framework.data.relational import (  # noqa: E402
    DistributionOfThreeDataModule,
    IdentityRulesDataModule,
    MatchToSampleDataModule,
    RelationalDigitsDataModule,
    SameDifferentDataModule,
)
from framework.models.relational import ConcatMLP, CoRelNet, ObjectSetModel, RelationNetwork  # noqa: E402

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
# task: (data module, objects of a scored set, candidates, objects per candidate)
TASKS = {
    "same_different": (SameDifferentDataModule, 2, 0, 1),
    "match_to_sample": (MatchToSampleDataModule, 4, 2, 2),
    "distribution_of_three": (DistributionOfThreeDataModule, 6, 4, 1),
    "identity_rules": (IdentityRulesDataModule, 6, 4, 1),
}
MODELS = ("CoRelNet", "relation network", "MLP")


def build(model: str, objects: int, candidates: int, candidate_size: int) -> ObjectSetModel:
    common = dict(input_size=64, num_objects=objects, num_classes=candidates or 2, embedding_size=32, encoder_hidden=(64,), num_candidates=candidates, candidate_size=candidate_size)
    if model == "CoRelNet":
        return CoRelNet(**common, decoder_hidden=(64,), context_norm=objects >= 3)
    if model == "relation network":
        return RelationNetwork(**common, relation_hidden=(64, 64), output_hidden=(64,))
    return ConcatMLP(**common, decoder_hidden=(64,))


def accuracy(model: ObjectSetModel, loader) -> float:
    model.eval()
    with torch.no_grad():
        correct = [(model(x).argmax(dim=-1) == y).float() for x, y in loader]
    model.train()
    return torch.cat(correct).mean().item()


def train(model: ObjectSetModel, data: RelationalDigitsDataModule, epochs: int, lr: float) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return accuracy(model, data.val_dataloader()), accuracy(model, data.test_dataloader())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("logs/studies/relational.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Tasks measured before (same settings) are kept, so one task can be rerun alone.
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    settings = {"train_size": args.train_size, "epochs": args.epochs, "seeds": args.seeds}
    results: dict = {**settings, "tasks": previous.get("tasks", {}) if all(previous.get(k) == v for k, v in settings.items()) else {}}
    for task in args.tasks:
        module, objects, candidates, candidate_size = TASKS[task]
        results["tasks"][task] = {}
        for model_name in MODELS:
            runs = []
            for seed in args.seeds:
                data = module(train_size=args.train_size, val_size=1000, test_size=1000, seed=seed)
                data.setup()
                torch.manual_seed(seed)
                start = time.perf_counter()
                runs.append((*train(build(model_name, objects, candidates, candidate_size), data, args.epochs, args.lr), time.perf_counter() - start))
            results["tasks"][task][model_name] = runs
            ind, ood = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{task} {model_name}: in distribution {statistics.mean(ind):.3f} {[round(a, 3) for a in ind]}, held-out digits {statistics.mean(ood):.3f} {[round(a, 3) for a in ood]}, {sum(r[2] for r in runs):.0f} s", flush=True)

    measured = [task for task in TASKS if task in results["tasks"]]
    figure, axes = plt.subplots(1, len(measured), figsize=(3.2 * len(measured), 3.6), sharey=True, squeeze=False)
    for axis, task in zip(axes[0], measured):
        chance = 1 / (TASKS[task][2] or 2)
        for offset, (split, index) in enumerate((("in distribution", 0), ("held-out digits", 1))):
            means = [statistics.mean(r[index] for r in results["tasks"][task][m]) for m in MODELS]
            positions = [i + (offset - 0.5) * 0.38 for i in range(len(MODELS))]
            axis.bar(positions, means, width=0.38, label=split)
        axis.axhline(chance, color="black", linestyle="--", linewidth=0.8, label="chance")
        axis.set_xticks(range(len(MODELS)), MODELS, rotation=20)
        axis.set_title(task.replace("_", " "))
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"accuracy (mean of {len(args.seeds)} seeds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURES / "relational_ood.png", dpi=120)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
