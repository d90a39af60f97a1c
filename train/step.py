"""The jitted data-parallel training and evaluation steps.

Both consume S padded sub-batches stacked along a leading axis ([S, ...], sharded over the mesh's
``data`` axis; see ``train.sharding``). The per-sub-batch loss is ``jax.vmap``-ed over that axis and
averaged, so every gather stays inside one sub-batch and XLA all-reduces the gradient.

A step whose loss or gradient is not finite changes nothing but the counters: parameters, optimiser
state (moments and step count, hence the schedule) and EMA keep their values.

The builders are memoised on their (hashable) configuration, so a process that runs several
trainings of one configuration (tests, notebooks, a resumed run) traces and compiles each step once.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from e2former_jax.config import E2FormerConfig
from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former
from e2former_jax.potential import energy_and_forces, output_and_forces
from train import sharding
from train.data.batch import Batch
from train.loss import loss_terms, molecule_error_sums
from train.optimizer import make_optimizer
from train.run_config import ForceMode, LossConfig, OptimConfig
from train.state import TrainState, ema_update


def predict(model: E2Former, params, graph: Graph, forces: ForceMode) -> tuple[jax.Array, jax.Array]:
  """Energies [B] and forces [N, 3] of one sub-batch: direct head or -dE/dx."""
  return energy_and_forces(model, params, graph, conservative=forces is ForceMode.CONSERVATIVE)


@functools.lru_cache(maxsize=None)
def make_init(model_config: E2FormerConfig) -> Callable:
  """Jitted ``init(key, graph) -> variables`` of the model."""
  return jax.jit(E2Former(model_config).init)


@functools.lru_cache(maxsize=None)
def make_train_step(model_config: E2FormerConfig, loss_config: LossConfig, optim_config: OptimConfig,
                    mesh: Mesh) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  """``step(state, batch, decay_steps) -> (state, metrics)``, jitted with explicit shardings.

  The optimiser is :func:`train.optimizer.make_optimizer` ``(optim_config, decay_steps, params)``;
  ``state`` must have been created with it. ``decay_steps`` (T of the schedule, an int32 scalar) is
  an argument, not a constant: a run that sizes T from its wall-clock budget (``train.budget``)
  fixes it after compiling. ``batch`` is a stacked :class:`~train.data.batch.Batch` [S, ...]
  sharded by :func:`train.sharding.shard_batch`; the state is replicated.

  Metrics (replicated scalars): loss, energy_loss, force_loss (means over the S sub-batches),
  grad_norm (before clipping), lr (of this update), finite (1.0 if the update was applied),
  nonfinite_run and nonfinite_total (the state's counters after the step).
  """
  model = E2Former(model_config)

  def sub_batch_loss(params, batch: Batch):
    energy, forces = predict(model, params, batch.graph, loss_config.forces)
    return loss_terms(loss_config, batch.graph, energy, forces, batch.energy, batch.forces)

  def mean_loss(params, batch: Batch):
    loss, terms = jax.vmap(sub_batch_loss, in_axes=(None, 0))(params, batch)  # [S], {k: [S]}
    return loss.mean(), jax.tree.map(jnp.mean, terms)

  def step(state: TrainState, batch: Batch, decay_steps: jax.Array):
    optimizer, schedule = make_optimizer(optim_config, decay_steps, state.params)
    (loss, terms), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params, batch)
    # Optimiser, EMA and the finiteness test run on flat [P] vectors: a few fused operations.
    flat_params, unravel = ravel_pytree(state.params)  # [P]
    flat_grads = ravel_pytree(grads)[0]  # [P]
    flat_ema = ravel_pytree(state.ema_params)[0]  # [P]
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(flat_grads))
    updates, opt_state = optimizer.update(flat_grads, state.opt_state, flat_params)
    new_params = flat_params + updates
    new_ema = ema_update(flat_ema, new_params, state.opt_step, optim_config.ema_decay)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    key = jax.random.wrap_key_data(state.rng)
    new_state = TrainState(
        step=state.step + 1,
        opt_step=state.opt_step + finite.astype(jnp.int32),
        params=unravel(keep_if_finite(new_params, flat_params)),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        ema_params=unravel(keep_if_finite(new_ema, flat_ema)),
        rng=jax.random.key_data(jax.random.split(key)[0]),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
    )
    metrics = {"loss": loss, **terms, "grad_norm": jnp.linalg.norm(flat_grads),
               "lr": schedule(state.opt_step), "finite": finite.astype(jnp.float32),
               "nonfinite_run": new_state.nonfinite_run, "nonfinite_total": new_state.nonfinite_total}
    return new_state, metrics

  # The state sharding is a prefix (replicated everywhere); sharding parameters later means passing
  # a pytree of shardings here and in train.sharding.state_sharding.
  state_sharding = sharding.replicated(mesh)
  # Donation lets the new state reuse the old state's device memory; the CPU backend cannot donate.
  donate = (0,) if jax.default_backend() != "cpu" else ()
  return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                                    sharding.replicated(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=donate)


@functools.lru_cache(maxsize=None)
def make_eval_step(model_config: E2FormerConfig, mesh: Mesh
                   ) -> Callable[[object, Batch], dict[str, jax.Array]]:
  """``eval_step(params, batch) -> {name: [S, B]}`` per-molecule error sums (see ``molecule_error_sums``).

  Forces are always scored as -dE/dx, the forces every simulation interface uses, and also from
  the direct head when the model has one, whichever of the two the run trained.
  Outputs stay sharded like the batch; read them with :func:`train.sharding.to_host_local`.
  """
  model = E2Former(model_config)

  def sub_batch(params, batch: Batch):
    out, forces = output_and_forces(model, params, batch.graph)
    return molecule_error_sums(batch.graph, out.energy, forces, batch.energy, batch.forces,
                               direct_forces=out.direct_forces)

  def step(params, batch: Batch):
    return jax.vmap(sub_batch, in_axes=(None, 0))(params, batch)

  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))
