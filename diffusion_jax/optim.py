"""The optax optimiser built from `config.optim`."""
from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def make_lr_schedule(optim: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `optim.lr`, then constant or cosine decay to 0."""
  if optim.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"Unknown optim.lr_schedule {optim.lr_schedule!r}; valid: "
                     f"{', '.join(LR_SCHEDULES)}.")
  if optim.lr <= 0 or optim.warmup_steps < 0:
    raise ValueError(f"optim.lr must be > 0 and optim.warmup_steps >= 0, got "
                     f"{optim.lr} and {optim.warmup_steps}.")
  warmup = optax.linear_schedule(0.0, optim.lr, max(int(optim.warmup_steps), 1))
  if optim.lr_schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  else:
    after = optax.cosine_decay_schedule(
        optim.lr, max(num_train_steps - int(optim.warmup_steps), 1))
  return optax.join_schedules([warmup, after], [int(optim.warmup_steps)])


def make_optimizer(optim: ml_collections.ConfigDict,
                   num_train_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then Adam/AdamW with the learning-rate schedule.

  The learning rate sits in the optimiser state (inject_hyperparams), so it
  can be logged and changed without recompiling the train step.
  """
  if optim.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optim.optimizer {optim.optimizer!r}; valid: "
                     f"{', '.join(OPTIMIZERS)}.")
  schedule = make_lr_schedule(optim, num_train_steps)
  kwargs = dict(learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.optimizer == "adam":
    opt = optax.inject_hyperparams(optax.adam)(**kwargs)
  else:
    opt = optax.inject_hyperparams(optax.adamw)(weight_decay=optim.weight_decay, **kwargs)
  if optim.grad_clip_norm < 0:
    raise ValueError(f"optim.grad_clip_norm must be >= 0 (0 disables), got "
                     f"{optim.grad_clip_norm}.")
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt)
  return optax.chain(optax.identity(), opt)


def current_lr(opt_state) -> float:
  """The learning rate used by the last update (from inject_hyperparams)."""
  return opt_state[1].hyperparams["learning_rate"]
