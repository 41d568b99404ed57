"""Training-step throughput of the dagan-gn engine against a straightforward WGAN-GP reference loop, same run.

    python benchmarks/train_step.py [--models dagan64 dagan128 dagan256 cifar_resnet] [--batch-size 8] [--iters 2]
                                    [--n-critic 5] [--device cpu|cuda|auto] [--threads 2] [--amp bf16]

One *iteration* = ``n_critic`` critic updates + 1 generator update (one generator step), on batches already in
memory (data loading is excluded from both sides). Networks come from the training configs in ``configs/`` at their
real widths; both sides start from the same weights and run the same number of Adam updates.

*Reference* — the common WGAN-GP/DAGAN port pattern, written here: plain fp32, NCHW, fakes generated **with**
gradients through G in every critic step (the critic loss back-propagates into G and those gradients are thrown away),
a separate ``autograd.grad(create_graph=True)`` penalty on detached fakes, and the generator step back-propagating
into the critic's parameters too. Its networks resample as the ports write them (nearest upsampling then a 3×3 conv;
a 3×3 conv then a 2×2 mean pool): ``set_fused_resampling(net, False)``.

*Engine* — ``dagan_gn.training.trainer.Trainer``'s own update functions (``_critic_update`` / ``_generator_update``,
the code ``dagan train`` runs): no-grad fakes from the bare generator, frozen critic in the generator step,
``channels_last`` when ``--channels-last`` (default on CUDA), autocast with ``--amp`` on CUDA, and the networks as
``build_networks`` makes them (resampling convs folded into one convolution each, ``dagan_gn.modules.resample``).
*Engine, literal nets* — the same update functions on the reference's literal networks: it separates the loop's gain
from the folded convolutions'. EMA is off on every side.

Timing: one warm-up each, then ``--iters`` iterations per side measured in turn (reference, engine with literal nets,
engine, reference, ...), the best kept (robust to a shared machine's changing load).

Printed: seconds per iteration, generator steps/s, critic steps/s, images/s (``batch × n_critic`` real images per
iteration), achieved GFLOP/s (FLOPs of one iteration counted with ``torch.utils.flop_counter.FlopCounterMode``) and its
fraction of the device's measured matmul rate, and the engine/reference speed ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _timing import best_seconds

from dagan_gn.config import load_config
from dagan_gn.modules.resample import set_fused_resampling
from dagan_gn.training.families import build_networks, get_family

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "dagan64": "configs/dagan_mammo_64.yaml",
    "dagan128": "configs/dagan_mammo_128.yaml",
    "dagan256": "configs/dagan_mammo_256.yaml",
    "cifar_resnet": "configs/cifar10_resnet_ln.yaml",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s of the device in ``dtype`` (the denominator of the utilisation column)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats, lambda: _sync(device))


class InMemory(torch.utils.data.Dataset):
    def __init__(self, cfg, n: int) -> None:
        c, s = cfg.model.channels, cfg.model.image_size
        self.images = torch.rand(n, c, s, s) * 2 - 1
        self.pairs = torch.rand(n, c, s, s) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0, "index": i, "pair": self.pairs[i]}


# ---------------------------------------------------------------------------------------------- the reference
class Reference:
    """The straightforward loop (see the module docstring)."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg, device: torch.device) -> None:
        self.G, self.D, self.cfg, self.device = G.to(device).train(), D.to(device).train(), cfg, device
        betas = tuple(cfg.optim.betas)
        self.opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.g_lr, betas=betas)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.d_lr, betas=betas)
        self.dagan = get_family(cfg.model.name).conditions_on_image  # G(x, z) and the pair critic

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape[0], self.G.z_dim, device=self.device)
        return self.G(x, z) if self.dagan else self.G(z)

    def _d(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        return self.D(x, other) if self.dagan else self.D(other)

    def iteration(self, batches: list[dict]) -> None:
        for batch in batches:
            x, x2 = batch["image"], batch.get("pair", batch["image"])
            self.opt_d.zero_grad()
            fake = self._fake(x)  # with grad through G: the critic loss back-propagates into G
            d_real = self._d(x, x2)
            d_fake = self._d(x, fake)
            alpha = torch.rand(x.shape[0], 1, 1, 1, device=self.device)
            interp = (alpha * x2 + (1 - alpha) * fake.detach()).requires_grad_(True)
            interp = interp.view_as(interp)  # a non-leaf, so FlopCounterMode's module hooks accept autograd.grad
            d_interp = self._d(x, interp)
            grads = torch.autograd.grad(d_interp.sum(), interp, create_graph=True)[0]
            gp = ((grads.reshape(grads.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()
            loss_d = d_fake.mean() - d_real.mean() + self.cfg.loss.gp_weight * gp
            loss_d.backward()
            self.opt_d.step()
        self.opt_g.zero_grad()
        x = batches[-1]["image"]
        loss_g = -self._d(x, self._fake(x)).mean()  # also fills the critic's .grad (discarded at its next step)
        loss_g.backward()
        self.opt_g.step()


# ---------------------------------------------------------------------------------------------- the engine
class Engine:
    """``Trainer``'s update functions on the same networks."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg, device: torch.device, run_dir: Path) -> None:
        from dagan_gn.training.trainer import Trainer

        self.trainer = Trainer(cfg, run_dir, dataset=InMemory(cfg, cfg.data.batch_size), networks=(G, D),
                               log=lambda m: None)

    def prepare(self, batches: list[dict]) -> list[dict]:
        return [self.trainer.model.prepare(b) for b in batches]

    def iteration(self, batches: list[dict]) -> None:
        for batch in batches:
            self.trainer._critic_update(batch, want_norm=False)
        self.trainer._generator_update(batches[-1], want_norm=False)


def _time_in_turn(fns: list, iters: int, device: torch.device) -> list[float]:
    """Best-of-``iters`` seconds of each function, measured in turn (a, b, c, a, b, c, ...) after one warm-up each,
    so a machine whose load changes during the run affects every side alike."""
    for fn in fns:
        fn()  # warm-up (allocator, oneDNN primitive cache, autotuning)
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


#: The three sides of a row, in timing order (see the module docstring).
SIDES = ("reference", "engine, literal nets", "engine")


def bench_model(name: str, args, device: torch.device, peak: float, *, sides: tuple[str, ...] = SIDES,
                overrides: tuple[str, ...] = (), count_flops: bool = True) -> dict:
    """Time ``sides`` (a subset of :data:`SIDES`) of one model, in turn, on the same initial weights.

    ``args`` carries ``batch_size``, ``n_critic``, ``amp``, ``channels_last``, ``compile`` and ``iters`` (the CLI's
    namespace, or any object with those attributes); ``overrides`` are extra dotted config overrides applied last
    (e.g. toy widths for a dry run, or ``train.amp_on_cpu=true`` to autocast on the CPU). ``count_flops=False``
    skips the ``FlopCounterMode`` pass (FLOPs come back NaN): for compiled generators, whose FLOPs equal the eager
    ones. Returns ``{"model", "batch", "sides": [(label, seconds per iteration, FLOPs per iteration)], "peak"}``.
    """
    unknown = [side for side in sides if side not in SIDES]
    if unknown or not sides:
        raise ValueError(f"unknown or no sides {unknown}; choose from {SIDES}")
    overrides = [
        f"data.batch_size={args.batch_size}", f"optim.n_critic={args.n_critic}", "data.num_workers=0",
        "data.hflip=false", f"train.device={device.type}", "train.ema_decay=0", "train.progress=false",
        "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=0", "metrics.eval_every=0",
        f"train.amp={args.amp if device.type == 'cuda' else 'none'}",
        f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
        *overrides,
    ]
    cfg = load_config(ROOT / CONFIGS[name], overrides)
    if cfg.model.critic_classes < 0:  # the mammography configs size the class head from the data: 3 classes
        cfg.model.critic_classes = 3
    torch.manual_seed(0)
    G, D = build_networks(cfg.model)
    G_literal, D_literal = copy.deepcopy(G), copy.deepcopy(D)  # same weights, two-step resampling
    set_fused_resampling(G_literal, False)
    set_fused_resampling(D_literal, False)
    c, s, b = cfg.model.channels, cfg.model.image_size, args.batch_size
    g = torch.Generator().manual_seed(1)
    raw = [{"image": torch.rand(b, c, s, s, generator=g) * 2 - 1, "pair": torch.rand(b, c, s, s, generator=g) * 2 - 1,
            "label": torch.zeros(b, dtype=torch.long)} for _ in range(args.n_critic)]
    with contextlib.ExitStack() as stack:
        fns = {}
        if "reference" in sides:
            ref = Reference(copy.deepcopy(G_literal), copy.deepcopy(D_literal), cfg, device)
            ref_batches = [{k: v.to(device) for k, v in batch.items()} for batch in raw]
            fns["reference"] = lambda: ref.iteration(ref_batches)
        for label, nets in (("engine, literal nets", (G_literal, D_literal)), ("engine", (G, D))):
            if label in sides:
                engine = Engine(*nets, cfg, device, Path(stack.enter_context(tempfile.TemporaryDirectory())))
                stack.callback(engine.trainer.close)
                batches = engine.prepare(raw)
                fns[label] = lambda engine=engine, batches=batches: engine.iteration(batches)
        labels = [side for side in SIDES if side in fns]
        flops = [_flops(fns[label]) if count_flops else float("nan") for label in labels]
        times = _time_in_turn([fns[label] for label in labels], args.iters, device)
    return {"model": name, "batch": b, "sides": list(zip(labels, times, flops)), "peak": peak}


def side_rows(result: dict, n_critic: int, reference_s: float | None = None) -> list[dict]:
    """The printed columns of each side of a :func:`bench_model` result, as numbers.

    ``speedup`` is the reference's seconds per iteration over the side's: the reference of the same result, else
    ``reference_s`` (a reference timed earlier in the same run), else NaN.
    """
    ref = dict((label, t) for label, t, _ in result["sides"]).get("reference", reference_s)
    rows = []
    for label, t, fl in result["sides"]:
        rows.append({
            "model": result["model"], "side": label, "batch": result["batch"], "s_per_iteration": t,
            "g_steps_per_s": 1 / t, "critic_steps_per_s": n_critic / t, "images_per_s": result["batch"] * n_critic / t,
            "gflop_per_iteration": fl / 1e9, "gflop_per_s": fl / t / 1e9, "fraction_of_peak": fl / t / result["peak"],
            "speedup": ref / t if ref else float("nan"),
        })
    return rows


# ---------------------------------------------------------------------------------------------- recipes
#: Whole training recipes compared as generator steps per second of ``Trainer.train_step`` (their own n_critic,
#: widths, identity terms): the Omniglot config before the identity-keeping work (today's: width 32, z 128, 5 critic
#: steps, no identity terms) against ``configs/dagan_omniglot_32.yaml`` as it is.
RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "omniglot, before (w32, 5 critic steps)": ("configs/dagan_omniglot_32.yaml", (
        "model.z_dim=128", "model.g_width=32", "model.d_width=32", "model.critic_classes=0", "optim.n_critic=5",
        "loss.class_weight=0", "loss.reconstruction=0", "data.rotate90=0", "train.ema_start=500",
        "model.g_kwargs={smooth_output: true}")),
    "omniglot, the config without the deformation output": ("configs/dagan_omniglot_32.yaml", (
        "model.g_kwargs={smooth_output: true}",)),
    "omniglot, configs/dagan_omniglot_32.yaml": ("configs/dagan_omniglot_32.yaml", ()),
}


class LabelledInMemory(InMemory):
    """:class:`InMemory` with labels cycling over ``classes`` (the class head's size comes from them)."""

    def __init__(self, cfg, n: int, classes: int) -> None:
        super().__init__(cfg, n)
        self.labels = torch.arange(n) % classes

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "label": int(self.labels[i])}


def bench_recipes(iters: int, steps: int = 10, classes: int = 192, threads: int = 2) -> list[dict]:
    """Seconds per generator step of each :data:`RECIPES` entry on the CPU (``steps`` steps per timing, ``iters``
    timings in turn, best kept) on 32-px random data of ``classes`` classes; the first recipe is the baseline."""
    from dagan_gn.training.trainer import Trainer

    torch.set_num_threads(threads)
    fns, stack = [], contextlib.ExitStack()
    with stack:
        for label, (path, overrides) in RECIPES.items():
            cfg = load_config(ROOT / path, [*overrides, "train.device=cpu", "train.progress=false",
                                            "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=0",
                                            "loss.embedding_steps=10"])
            trainer = Trainer(cfg, Path(stack.enter_context(tempfile.TemporaryDirectory())),
                              dataset=LabelledInMemory(cfg, 4 * cfg.data.batch_size, classes), log=lambda m: None)
            stack.callback(trainer.close)
            fns.append(lambda trainer=trainer: [trainer.train_step() for _ in range(steps)])
        times = [t / steps for t in _time_in_turn(fns, iters, torch.device("cpu"))]
    return [{"recipe": label, "s_per_step": t, "g_steps_per_s": 1 / t, "ratio": times[0] / t,
             "minutes_per_10k": 10_000 * t / 60} for label, t in zip(RECIPES, times)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch-size", type=int, default=8, help="images per critic batch (configs use 32-64 on a GPU)")
    p.add_argument("--iters", type=int, default=2,
                   help="timed iterations per side, alternating, best kept (after one warm-up)")
    p.add_argument("--n-critic", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    p.add_argument("--amp", default="bf16", help="engine autocast on CUDA: none, bf16, fp16 (CPU: always fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="engine memory format (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="engine: torch.compile the generator")
    p.add_argument("--recipes", action="store_true",
                   help="instead: generator steps/s of whole training recipes (RECIPES: the Omniglot config before "
                        "and after the identity-keeping work), same run, ratio to the first")
    args = p.parse_args()
    if args.recipes:
        print(f"CPU, {args.threads} threads; Trainer.train_step on 32-px random data of 192 classes, best of "
              f"{args.iters} timings of 10 steps each, in turn")
        print("| recipe | s / generator step | G steps/s | speed-up | minutes for 10,000 steps |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in bench_recipes(args.iters, threads=args.threads):
            print(f"| {row['recipe']} | {row['s_per_step']:.3f} | {row['g_steps_per_s']:.2f} | {row['ratio']:.2f}× | "
                  f"{row['minutes_per_10k']:.1f} |", flush=True)
        return
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    peak_dtype = torch.bfloat16 if device.type == "cuda" and args.amp == "bf16" else torch.float32
    peak = matmul_rate(device, peak_dtype, n=8192 if device.type == "cuda" else 2048)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {dev_name}; measured matmul rate {peak / 1e9:.0f} GFLOP/s ({str(peak_dtype)[6:]}); "
          f"batch {args.batch_size}, n_critic {args.n_critic}, {args.iters} timed iterations; engine "
          f"{'amp ' + args.amp if device.type == 'cuda' else 'fp32'}, channels_last={args.channels_last}")
    header = ("| model | side | s / iteration | G steps/s | critic steps/s | images/s | GFLOP / iteration | "
              "GFLOP/s | % of matmul rate | speed-up |")
    print(header)
    print("|" + " --- |" * 10)
    for name in args.models:
        for row in side_rows(bench_model(name, args, device, peak), args.n_critic):
            print(f"| {name} | {row['side']} | {row['s_per_iteration']:.3f} | {row['g_steps_per_s']:.3f} | "
                  f"{row['critic_steps_per_s']:.2f} | {row['images_per_s']:.1f} | {row['gflop_per_iteration']:.1f} | "
                  f"{row['gflop_per_s']:.1f} | {100 * row['fraction_of_peak']:.0f} % | {row['speedup']:.2f}× |",
                  flush=True)

if __name__ == "__main__":
    main()
