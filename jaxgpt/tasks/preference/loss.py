"""The preference objectives as pure functions of policy and reference log-probabilities.

For a pair with chosen response c and rejected r, the log-probability ratio against the
reference is h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)), each log-probability the
`sum` (the DPO paper, TRL) or the `mean` (the book's notebook) of the response tokens'. Losses:
- `sigmoid` (DPO): -log sigmoid(beta h); with label smoothing e (conservative DPO, the labels
  flipped with probability e): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
- `ipo`: (h - 1 / (2 beta))^2 (IPO; TRL's IPO also takes the mean reduction).
When the policy is the reference, h = 0 and the sigmoid loss is ln 2 for any beta, reduction or
smoothing. Rewards are beta (log pi(y) - log ref(y)), TRL's convention (the book reports them
without beta); the margin is chosen minus rejected reward, the accuracy the share of pairs whose
chosen reward is the larger.

`preference_loss_fn` is a Trainer loss: batches hold [B, 2, T] inputs and targets (chosen, then
rejected), one forward pass over the 2B rows, and its reference is either `frozen` (a frozen
copy of the start weights, or LoRA's frozen base: the model with its adapters off) or the
batch's stored "ref_logps" [B, 2]. The sum it returns is over pairs (`units` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.data.windows import IGNORE
from jaxgpt.lora.transform import LoRAConfig, lora_loss_fn
from jaxgpt.models.model import GPT

LOSSES = ("sigmoid", "ipo")
REDUCTIONS = ("sum", "mean")
REWARDS = "beta * (policy - reference) response log-probability"  # stated in each eval record


@dataclass(frozen=True)
class Objective:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reduction: str = "sum"


def sequence_logps(logits: jax.Array, targets: jax.Array, reduction: str = "sum") -> jax.Array:
    """[N] log-probability of each row's counted targets (sum, or mean over them), float32."""
    counted = targets != IGNORE  # [N, T]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [N, T, V]
    picked = jnp.take_along_axis(logp, jnp.where(counted, targets, 0)[..., None], -1)[..., 0]
    total = jnp.sum(jnp.where(counted, picked, 0.0), axis=-1)  # [N]
    if reduction == "mean":
        return total / jnp.maximum(jnp.sum(counted, axis=-1), 1)
    return total


def preference_losses(policy: jax.Array, reference: jax.Array, objective: Objective):
    """(losses, chosen rewards, rejected rewards), each [B], from [B, 2] log-probabilities."""
    beta = objective.beta
    h = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    if objective.loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        e = objective.label_smoothing
        losses = -(1.0 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
    rewards = jax.lax.stop_gradient(beta * (policy - reference))  # [B, 2]
    return losses, rewards[:, 0], rewards[:, 1]


def logps_fn(config: GPTConfig, reduction: str):
    """A Trainer-style function (params, frozen, batch, rng, det) -> ([B, 2] log-probs, None)."""
    model = GPT(config)

    def fn(params, frozen, batch, rng, deterministic):
        del frozen
        b, _, t = batch["inputs"].shape
        rngs = None if rng is None else {"dropout": rng}
        logits = model.apply({"params": params}, batch["inputs"].reshape(2 * b, t), deterministic,
                             rngs=rngs)  # [2B, T, V]
        logps = sequence_logps(logits, batch["targets"].reshape(2 * b, t), reduction)
        return logps.reshape(b, 2), None

    return fn


def pair_count(batch: dict) -> jax.Array:
    """The pairs a batch holds (rows that only fill a batch count 0)."""
    return jnp.sum(batch["pairs"])


def preference_loss_fn(config: GPTConfig, objective: Objective, *, stored: bool,
                       lora: LoRAConfig | None = None):
    """loss_fn(params, frozen, batch, rng, det) -> (summed pair losses, summed metrics)."""
    base = logps_fn(config, objective.reduction)
    policy_fn = base if lora is None else lora_loss_fn(base, lora)

    def loss_fn(params, frozen, batch, rng, deterministic):
        policy, _ = policy_fn(params, frozen, batch, rng, deterministic)  # [B, 2]
        if stored:
            reference = batch["ref_logps"]
        else:  # the frozen tree is the whole reference model (a copy, or LoRA's base)
            reference, _ = base(frozen, None, batch, rng, True)
        reference = jax.lax.stop_gradient(reference)
        losses, chosen, rejected = preference_losses(policy, reference, objective)
        w = batch["pairs"].reshape(-1).astype(jnp.float32)  # [B]
        aux = {"chosen_reward": jnp.sum(w * chosen), "rejected_reward": jnp.sum(w * rejected),
               "correct": jnp.sum(w * (chosen > rejected))}
        return jnp.sum(w * losses), aux

    return loss_fn


def eval_metrics(results: list[dict]) -> dict:
    """Per-pair means of the rewards, their margin and the accuracy over eval_step outputs."""
    n = max(sum(float(r["count"]) for r in results), 1.0)
    total = {k: sum(float(r["aux"][k]) for r in results) / n
             for k in ("chosen_reward", "rejected_reward", "correct")}
    return {"chosen_reward": total["chosen_reward"], "rejected_reward": total["rejected_reward"],
            "margin": total["chosen_reward"] - total["rejected_reward"],
            "accuracy": total["correct"], "reward_convention": REWARDS}
