"""Evaluate a trained DROP policy and print its D4RL-normalised score.

python eval.py runs/RUN_DIR --episodes 10
"""

import os
from dataclasses import dataclass

import tyro

from checkpoint import load_checkpoint
from datasets import REF_SCORES, DatasetError, make_gym_env, normalized_score
from sac import Actor, evaluate


@dataclass
class Args:
    run_dir: tyro.conf.Positional[str]
    """a run folder holding checkpoint.pt (or the checkpoint file itself)"""
    episodes: int = 10
    """deterministic evaluation episodes"""
    seed: int = 0
    """seed of the first episode's reset; episode i uses seed + i"""
    env: str | None = None
    """Gymnasium id to evaluate on instead of the checkpoint's own (must be the same robot)"""


def load_policy(path: str, env_id: str | None):
    """The actor of a drop.py checkpoint, its metadata and the env to run it on (the checkpoint's own unless `env_id`)."""
    checkpoint = load_checkpoint(path, ("actor", "family", "obs_dim", "act_dim", "eval_env_id", "dataset", "epoch"))
    actor_state, family, obs_dim, act_dim = (
        checkpoint["actor"],
        checkpoint["family"],
        checkpoint["obs_dim"],
        checkpoint["act_dim"],
    )
    env_id = env_id or checkpoint["eval_env_id"]
    try:
        env = make_gym_env(env_id)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    if (
        not env_id.lower().startswith(family)
        or env.observation_space.shape != (obs_dim,)
        or env.action_space.shape != (act_dim,)
    ):
        raise SystemExit(
            f"error: {path} holds a {family} policy (obs {obs_dim}, act {act_dim}); it cannot run on {env_id} (obs {env.observation_space.shape[0]}, act {env.action_space.shape[0]})"
        )
    log_std_min = (
        checkpoint.get("args", {}).get("sac", {}).get("log_std_min", -20.0)
    )  # the floor it was trained with (sampling only)
    actor = Actor(obs_dim, act_dim, actor_state["mean.weight"].shape[1], log_std_min)
    actor.load_state_dict(actor_state)
    return actor, checkpoint, env


def main(args: Args):
    path = args.run_dir if args.run_dir.endswith(".pt") else os.path.join(args.run_dir, "checkpoint.pt")
    actor, checkpoint, env = load_policy(path, args.env)
    returns = evaluate(actor, env, args.episodes, args.seed)
    scores = normalized_score(checkpoint["family"], returns)
    random_return, expert_return = REF_SCORES[checkpoint["family"]]
    print(f"{checkpoint['dataset']} on {env.spec.id}, epoch {checkpoint['epoch'] + 1}, {args.episodes} episodes")
    print(
        f"return: {returns.mean():.1f} ± {returns.std():.1f} (D4RL random {random_return:.1f}, expert {expert_return:.1f})"
    )
    print(f"normalized score: {scores.mean():.1f} ± {scores.std():.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
