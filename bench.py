"""Benchmark: what each part of a DROP epoch costs, for --penalty drop, mopo and none.

    python bench.py                      # hopper (11/3) and halfcheetah (17/6) shapes, printed as a table
    python bench.py --json out.json      # the same, also as JSON
    python bench.py --device cuda        # on a GPU
    python bench.py --checkpoint         # instead: the size, write time and memory of a full-size checkpoint

Synthetic data with the real shapes: 1M real transitions, 7 members / 5 elites, 50,000 rollout
starts, h = 5, batch 256, 1000 SAC updates and 400 DICE steps per epoch. An epoch runs exactly
drop.py's functions in drop.py's order: train_dice, rollout, then SAC updates on mixed batches.
The three penalties are measured interleaved (drop, mopo, none, drop, ...) after a warm-up, so
drift on a shared machine hits them alike; medians are reported with the min and max.
For drop it also times the policy sampling inside the DICE steps on its own (a' and a0), the
part of DICE's cost that no choice of heads can remove.
The synthetic dynamics never terminate a rollout, so rollouts run their full length (the
worst case for every penalty).
"""

import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

import drop
from checkpoint import RESUME_KEYS, RunRecord, buffer_state, load_buffer_state, load_checkpoint, save_checkpoint
from datasets import OBS_ACT_DIMS
from dice import DiceConfig, resolve
from dynamics import DynamicsConfig, ProbabilisticEnsemble, transition_targets
from penalties import build_penalty
from sac import SAC, ReplayBuffer, SACConfig, pick_device

PENALTIES = ("drop", "mopo", "none")


@dataclass
class Args:
    families: tuple[str, ...] = ("hopper", "halfcheetah")
    """which observation/action shapes to measure (hopper 11/3, walker2d and halfcheetah 17/6)"""
    num_transitions: int = 1_000_000
    """synthetic real transitions"""
    rollout_batch_size: int = 50_000
    """rollout start states per epoch"""
    horizon: int = 5
    """rollout length"""
    sac_updates: int = 1000
    """SAC updates per epoch"""
    dice_steps: int = 400
    """GradientDICE steps per epoch"""
    dynamics_steps: int = 100
    """dynamics training steps timed; scaled up to one pass over the data"""
    repeats: int = 3
    """timed epochs per penalty"""
    warmup: int = 1
    """untimed epochs per penalty first"""
    device: str = "auto"
    """torch device: auto, cpu or cuda"""
    json: str | None = None
    """also write the results to this JSON file"""
    tiny: bool = False
    """a seconds-long smoke run with small sizes (for the tests); its numbers mean nothing"""
    seed: int = 0
    """seed of the synthetic data and networks"""
    sac: SACConfig = field(default_factory=SACConfig)
    """SAC hyperparameters"""
    checkpoint: bool = False
    """instead of the epoch: write drop.py's checkpoint of a run with a full model buffer (shapes of the first of --families), --repeats times"""
    checkpoint_out: str = "checkpoint-bench.pt"
    """where --checkpoint writes it (removed afterwards)"""


TINY = dict(
    num_transitions=2000,
    rollout_batch_size=500,
    horizon=2,
    sac_updates=10,
    dice_steps=5,
    dynamics_steps=3,
    repeats=1,
    warmup=0,
)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    """fn's result and its wall time, with the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def dynamics_seconds_per_epoch(
    dynamics: ProbabilisticEnsemble, real: ReplayBuffer, args: Args, device: torch.device
) -> float:
    """Time `dynamics_steps` training steps; one epoch is one pass of every member over its bootstrap sample."""
    optimizer = torch.optim.Adam(dynamics.parameters(), lr=dynamics.config.lr)
    batch = dynamics.config.batch_size

    def steps():
        for _ in range(args.dynamics_steps):
            idx = torch.randint(real.size, (dynamics.config.num_members, batch), device=device)
            loss = dynamics.loss(
                real.obs[idx], real.act[idx], transition_targets(real.obs[idx], real.next_obs[idx], real.rew[idx])
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    steps()  # warm-up
    _, seconds = timed(steps, device)
    return seconds / args.dynamics_steps * (real.size / batch)


def bench_family(family: str, args: Args, device: torch.device) -> dict:
    obs_dim, act_dim = OBS_ACT_DIMS[family]
    real = ReplayBuffer(args.num_transitions, obs_dim, act_dim, device)
    n = args.num_transitions
    real.add(
        torch.randn(n, obs_dim, device=device),
        torch.rand(n, act_dim, device=device) * 2 - 1,
        torch.randn(n, device=device),
        torch.randn(n, obs_dim, device=device),
        torch.zeros(n, device=device),
    )
    real_obs, real_act = real.obs[: real.size], real.act[: real.size]
    dynamics = ProbabilisticEnsemble(obs_dim, act_dim, DynamicsConfig()).to(device)
    dynamics_seconds = dynamics_seconds_per_epoch(dynamics, real, args, device)
    dynamics.requires_grad_(False)

    runs = {}
    for name in PENALTIES:
        ratio = dict(dice_steps=args.dice_steps, clip=(0.01, 10.0), transform="log") if name == "drop" else {}
        given = drop.Args(
            penalty=name, rollout_batch_size=args.rollout_batch_size, sac=args.sac, horizon=args.horizon, **ratio
        )
        drop_args, _ = drop.settings(given, f"{family}-medium")
        agent = SAC(obs_dim, act_dim, args.sac, device)
        model_buffer = ReplayBuffer(drop.model_buffer_capacity(drop_args, args.horizon), obs_dim, act_dim, device)
        sample_action = (lambda actor: lambda obs: actor(obs)[0])(agent.actor)
        penalty = build_penalty(drop_args, dynamics, real_obs, real_act, model_buffer, sample_action)
        # DROP's penalty caches each elite's next state for the data at its first training (its cost is reported apart).
        _, cache_seconds = timed(lambda: penalty.fit(0), device) if name == "drop" else (None, None)
        runs[name] = dict(
            args=drop_args,
            agent=agent,
            buffer=model_buffer,
            penalty=penalty,
            sample_action=sample_action,
            times=[],
            cache_seconds=cache_seconds,
        )
    dice_config = resolve(DiceConfig())

    terminated_fn = drop.rollout_termination(
        "halfcheetah", real_obs, drop.Args().halt_margin
    )  # drop.py's default: halt outside the data's range

    def epoch(run) -> dict[str, float]:
        """One drop.py epoch, each part timed."""
        agent, penalty, sample_action = run["agent"], run["penalty"], run["sample_action"]
        parts = {"dice_seconds": 0.0, "dice_policy_seconds": 0.0}
        if run["args"].penalty == "drop":
            _, parts["dice_seconds"] = timed(lambda: penalty.train(args.dice_steps), device)
            # Policy sampling alone: a' for each elite's next state plus a0, (elites + 1) x batch rows a step.
            rows = real_obs[
                torch.randint(
                    real.size, (args.dice_steps, (len(dynamics.elites) + 1) * dice_config.batch_size), device=device
                )
            ]
            with torch.no_grad():
                _, parts["dice_policy_seconds"] = timed(
                    lambda: [sample_action(step_rows) for step_rows in rows], device
                )
        start_obs = real_obs[torch.randint(real.size, (args.rollout_batch_size,), device=device)]
        _, parts["rollout_seconds"] = timed(
            lambda: drop.rollout(dynamics, agent.actor, penalty, start_obs, run["args"], terminated_fn, run["buffer"]),
            device,
        )

        def updates():
            for _ in range(args.sac_updates):
                agent.update(drop.mixed_batch(real, run["buffer"], args.sac.batch_size, run["args"].real_ratio))

        _, sac_seconds = timed(updates, device)
        parts["sac_updates_per_s"] = args.sac_updates / sac_seconds
        parts["epoch_seconds"] = parts["dice_seconds"] + parts["rollout_seconds"] + sac_seconds
        return parts

    for i in range(args.warmup + args.repeats):
        for penalty in PENALTIES:
            parts = epoch(runs[penalty])
            if i >= args.warmup:
                runs[penalty]["times"].append(parts)

    results = {}
    for penalty, run in runs.items():
        keys = run["times"][0].keys()
        results[penalty] = {key: statistics.median(t[key] for t in run["times"]) for key in keys}
        results[penalty]["spread"] = {
            key: [min(t[key] for t in run["times"]), max(t[key] for t in run["times"])] for key in keys
        }
        results[penalty]["dynamics_train_seconds_per_epoch"] = dynamics_seconds
        if run["cache_seconds"] is not None:
            results[penalty]["dice_cache_seconds_once"] = run["cache_seconds"]
    epoch_seconds = {p: results[p]["epoch_seconds"] for p in PENALTIES}
    results["ratios"] = {
        "drop_over_none": epoch_seconds["drop"] / epoch_seconds["none"],
        "drop_over_mopo": epoch_seconds["drop"] / epoch_seconds["mopo"],
    }
    results["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def print_table(family: str, results: dict):
    print(f"\n{family}: epoch = DICE + rollout + SAC updates (median of repeats; [min, max])")
    print(
        f"{'penalty':8} {'epoch s':>20} {'DICE s':>8} {'of it pi s':>10} {'rollout s':>10} {'SAC upd/s':>10} {'dyn train s/epoch':>18}"
    )
    for penalty in PENALTIES:
        r = results[penalty]
        lo, hi = r["spread"]["epoch_seconds"]
        print(
            f"{penalty:8} {r['epoch_seconds']:8.2f} [{lo:5.2f}, {hi:5.2f}] {r['dice_seconds']:8.2f} {r['dice_policy_seconds']:10.2f} {r['rollout_seconds']:10.2f} {r['sac_updates_per_s']:10.1f} {r['dynamics_train_seconds_per_epoch']:18.1f}"
        )
    ratios = results["ratios"]
    print(
        f"drop/none = {ratios['drop_over_none']:.3f} (target <= 1.10), drop/mopo = {ratios['drop_over_mopo']:.3f} (target <= 1.00), peak RSS {results['peak_rss_mb']:.0f} MB"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_checkpoint(family: str, args: Args):
    """Size, write time and memory of drop.py's checkpoint for a run whose model buffer is full."""
    obs_dim, act_dim = OBS_ACT_DIMS[family]
    run, _ = drop.settings(drop.Args(env=f"builtin-{family}-medium"), f"{family}-medium")
    cpu = torch.device("cpu")
    agent = SAC(obs_dim, act_dim, run.sac, cpu)
    model_buffer = ReplayBuffer(drop.model_buffer_capacity(run, run.horizon), obs_dim, act_dim, cpu)
    dynamics = ProbabilisticEnsemble(obs_dim, act_dim, run.dynamics)
    penalty = build_penalty(
        run, dynamics, torch.zeros(1, obs_dim), torch.zeros(1, act_dim), model_buffer, lambda obs: agent.actor(obs)[0]
    )
    for storage in (model_buffer.obs, model_buffer.act, model_buffer.rew, model_buffer.next_obs):
        storage.normal_()  # in place: no second copy in memory before the measurement
    model_buffer.size = model_buffer.capacity
    data = type(
        "Data", (), {"name": run.env, "family": family, "eval_env_id": "", "obs_dim": obs_dim, "act_dim": act_dim}
    )()
    eval_history = [{"epoch": 10 * i + 9, "normalized_score": 0.0} for i in range(run.epochs // 10)]
    record = RunRecord("", run, data, "", "", run.epochs, eval_history=eval_history)
    buffer_mb = sum(t.nbytes for t in buffer_state(model_buffer).values() if isinstance(t, torch.Tensor)) / 2**20

    rss_before, seconds = current_rss_mb(), []
    for _ in range(args.repeats):
        start = time.perf_counter()
        save_checkpoint(args.checkpoint_out, agent, penalty, model_buffer, record, 0)
        seconds.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    size_mb = os.path.getsize(args.checkpoint_out) / 2**20
    start = time.perf_counter()
    load_checkpoint(args.checkpoint_out, RESUME_KEYS, mmap=True)
    load_buffer_state(model_buffer, torch.load(args.checkpoint_out, weights_only=True, mmap=True)["model_buffer"])
    load_seconds = time.perf_counter() - start
    os.remove(args.checkpoint_out)
    write = statistics.median(seconds)
    print(
        f"{family}: model buffer {model_buffer.capacity:,} transitions ({buffer_mb:.0f} MB); checkpoint {size_mb:.0f} MB"
    )
    print(
        f"write (torch.save + fsync + rename): median {write:.2f} s over {args.repeats} [{min(seconds):.2f}, {max(seconds):.2f}]; "
        f"every {run.eval_every} epochs of ~9 s: {100 * write / (run.eval_every * 9):.2f}% of the run"
    )
    print(
        f"memory: RSS {rss_before:.0f} MB before writing, peak {peak:.0f} MB while writing (+{peak - rss_before:.0f} MB)"
    )
    print(f"read back (resume: open the file, copy the buffer in; file in the page cache): {load_seconds:.2f} s")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(args: Args):
    if args.tiny:
        args = replace(args, **TINY)
    if args.checkpoint:
        return bench_checkpoint(args.families[0], args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in asdict(args).items() if k not in ("json", "sac")},
    }
    for family in args.families:
        report[family] = bench_family(family, args, device)
        print_table(family, report[family])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
