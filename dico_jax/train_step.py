"""The train state and one sharded train step: pure JAX, Flax and Optax.

`train_step` is the maths of a step (loss, AdamW, EMA); `make_train_step` jits it with the
mesh's shardings and a donated state. Nothing here reads data, writes files or logs, so the
benchmarks and `tools.plan` use it as the trainer does (`dico_jax.train` is the loop).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dico_jax import sharding as sharding_lib
from dico_jax.diffusion import FlowMatching, GaussianDiffusion
from dico_jax.diffusion.meanflow import MeanFlow, network_times
from dico_jax.diffusion.shortcut import Shortcut
from dico_jax.models import time_inputs

Objective = GaussianDiffusion | FlowMatching | MeanFlow | Shortcut

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # steps completed
    params: Any
    ema_params: Any
    opt_state: Any

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
                "opt_state": self.opt_state}


def create_train_state(key: jax.Array, model: Any, tx: optax.GradientTransformation,
                       latent_shape: tuple[int, int, int]) -> TrainState:
    """Fresh parameters; the EMA starts equal to them (as the official recipe)."""
    x = jnp.zeros((1, *latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = model.init({"params": key}, x, t, t, **time_inputs(model, t))["params"]
    # A separate copy: params and EMA are donated to the step as distinct buffers.
    ema_params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                      opt_state=tx.init(params))


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh, min_size: int) -> TrainState:
    """Params, EMA and the Adam moments split by the FSDP rule; scalars replicated."""
    return sharding_lib.param_shardings(abstract_state, mesh, min_size)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, base key of the steps); step s draws from fold_in(base key, s).

    Parameters are drawn with the "rbg" generator: about fifty threefry draws would dominate
    the compile time of `init` (more than twice as long for DiCo-XL). rbg values are identical across
    shardings but not across CPU/GPU/TPU; the steps keep threefry, identical everywhere.
    """
    _, step_key = jax.random.split(jax.random.key(seed))
    return jax.random.key(seed, impl="rbg"), step_key


# ---------------------------------------------------------------------------------------------
# The step.


def step_draws(step_key: jax.Array, step: jax.Array, labels: jax.Array,
               latent_shape: tuple[int, ...], diffusion: Objective,
               drop_prob: float) -> tuple[Any, jax.Array, jax.Array | None]:
    """Timesteps, noise and label-drop mask of every position of step `step`'s global batch.

    Drawn for the whole batch from fold_in(step_key, step), so they depend on the seed, the
    step and the position only: not on the devices, the processes or how the batch is cut
    into micro-batches. The timesteps are integer DDPM steps, or flow times in [0, 1] from
    `FlowMatching.sample_time`, drawn from the same key. The drop mask is None when the model
    has no null label.
    """
    key = jax.random.fold_in(step_key, step)
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    n = labels.shape[0]
    if isinstance(diffusion, FlowMatching):
        t = diffusion.sample_time(t_key, n)
    elif isinstance(diffusion, (MeanFlow, Shortcut)):
        t = diffusion.sample_times(t_key, n)
    else:
        t = jax.random.randint(t_key, (n,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_key, (n, *latent_shape), jnp.float32)
    drop = jax.random.uniform(dropout_key, (n,)) < drop_prob if drop_prob > 0 else None
    return t, noise, drop


def loss_terms(diffusion: Objective) -> tuple[str, ...]:
    """The per-example terms besides "loss" that a step averages and reports: the DDPM
    objective's "mse" and "vb" (its learned-variance bound), flow matching's "mse" (and
    "cos", its velocity-direction term, when weighted), the few-step objectives' "mse"."""
    if isinstance(diffusion, GaussianDiffusion):
        return ("mse", "vb")
    if isinstance(diffusion, FlowMatching) and diffusion.cosine_weight:
        return ("mse", "cos")
    return ("mse",)


def few_step_losses(diffusion: MeanFlow | Shortcut, model: Any, params: Any,
                    teacher_params: Any, m: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The per-example terms of a few-step objective on micro-batch `m`. The network takes
    the interval [r, t] (a shortcut step: [t - d, t]) as its two time inputs
    (`meanflow.network_times`); `teacher_params` make the shortcut model's self-consistency
    targets."""
    def network(p, labels, drop):
        def u_fn(z, r, t):
            first, second = network_times(r, t)
            return model.apply({"params": p}, z, first, labels, h=second, force_drop=drop)
        return u_fn

    y, drop = m["y"], m["drop"]
    if isinstance(diffusion, MeanFlow):
        r, t = m["t"]
        # Guidance folded into the target (Eq. 21) takes u(z_t, t, t) with the labels and
        # with the null label.
        return diffusion.training_losses(
            network(params, y, drop), m["x"], r, t, m["noise"],
            u_cond=network(params, y, None), u_uncond=network(params, y, jnp.ones_like(y, bool)),
            dropped=drop)
    # Shortcut: the self-consistency rows keep their labels (the authors drop only the
    # flow-matching rows' labels); the teacher sees those rows alone, without gradient.
    k = diffusion.bootstrap_every
    if drop is not None:
        drop = drop & ~diffusion.bootstrap_rows(y.shape[0])
    student = network(params, y, drop)
    teacher = network(jax.lax.stop_gradient(teacher_params), y[::k], None)
    return diffusion.training_losses(lambda z, t, d: student(z, t - d, t),
                                     lambda z, t, d: teacher(z, t - d, t),
                                     m["x"], m["t"], m["noise"])


def _micro_batches(tree: Any, k: int) -> Any:
    """(N, ...) arrays as (k, N / k, ...): micro-batch j holds positions j, j + k, j + 2k, ...

    Interleaved rather than contiguous so that each device keeps its own rows: a device's
    contiguous block of the batch holds a share of every micro-batch, and cutting the batch
    moves no data.
    """
    def split(a):
        a = a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
        return sharding_lib.constrain_batch(a, batch_dim=1)
    return jax.tree.map(split, tree)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: Any,
               diffusion: Objective, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, ema_decay: float,
               step_key: jax.Array, grad_accum_steps: int = 1) -> tuple[TrainState, Metrics]:
    """One AdamW step on the objective's loss (DDPM, flow matching, MeanFlow or shortcut)
    and the EMA update.

    The loss and gradient are those of the whole global batch; with `grad_accum_steps` = k
    they are accumulated over k micro-batches in a `lax.scan` (the activations of one
    micro-batch live at a time), with the same timesteps, noise and label drops
    (`step_draws`). Returns the new state and scalar metrics: "loss", the `loss_terms` of the
    objective, "grad_norm" and "lr".
    """
    x, y = batch["latent"].astype(jnp.float32), batch["label"]
    t, noise, drop = step_draws(step_key, state.step, y, x.shape[1:], diffusion,
                                float(model.class_dropout_prob))
    names = loss_terms(diffusion)
    micro = {"x": x, "y": y, "t": t, "noise": noise, "drop": drop}

    def loss_fn(params, m):
        if isinstance(diffusion, (MeanFlow, Shortcut)):
            teacher = (state.ema_params if getattr(diffusion, "ema_teacher", False)
                       else params)
            terms = few_step_losses(diffusion, model, params, teacher, m)
        else:
            def model_fn(x_t, timesteps):
                return model.apply({"params": params}, x_t, timesteps, m["y"],
                                   force_drop=m["drop"])
            terms = diffusion.training_losses(model_fn, m["x"], m["t"], m["noise"])
        return jnp.mean(terms["loss"]), {k: jnp.mean(terms[k]) for k in names}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, terms), grads = grad_fn(state.params, micro)
    else:
        def accumulate(carry, m):
            (loss, terms), grads = grad_fn(state.params, m)
            return jax.tree.map(jnp.add, carry, (loss, terms, grads)), None

        scalar = jnp.zeros((), jnp.float32)
        zeros = (scalar, {k: scalar for k in names}, jax.tree.map(jnp.zeros_like, state.params))
        total, _ = jax.lax.scan(accumulate, zeros, _micro_batches(micro, grad_accum_steps))
        loss, terms, grads = jax.tree.map(lambda v: v / grad_accum_steps, total)
    with jax.named_scope("optimizer"):  # names the kernels in profiles and tools/roofline
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    with jax.named_scope("ema"):
        ema_params = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay),
                                  state.ema_params, params)
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": optax.global_norm(grads),
        "lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state)
    return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, model: Any,
                    diffusion: Objective,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    shardings: TrainState, mesh: jax.sharding.Mesh) -> Callable:
    """`train_step` jitted with explicit shardings; the input state is donated."""
    _, step_key = seed_keys(config.seed)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step_fn = functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                                lr_schedule=lr_schedule, ema_decay=float(config.ema_decay),
                                step_key=step_key,
                                grad_accum_steps=int(config.get("grad_accum_steps", 1)))

    def step(state, batch):
        # Traced under the mesh, so the network keeps its activations split along the batch.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, batch)

    return jax.jit(step,
                   in_shardings=(shardings, {"latent": batch_sharding, "label": batch_sharding}),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=(0,))


def init_state(config: ml_collections.ConfigDict, model: Any, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, latent_shape: tuple[int, int, int]
               ) -> tuple[Callable[[], TrainState], TrainState, TrainState]:
    """(init function, abstract state, shardings): `init()` builds the state already sharded."""
    init_key, _ = seed_keys(config.seed)
    create = functools.partial(create_train_state, model=model, tx=tx, latent_shape=latent_shape)
    abstract = jax.eval_shape(create, init_key)
    shardings = state_shardings(abstract, mesh, config.fsdp_min_size)
    init = jax.jit(create, out_shardings=shardings)
    return functools.partial(init, init_key), abstract, shardings


def batch_spec(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               latent_shape: tuple[int, int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and shardings of a global batch (for ahead-of-time compilation)."""
    s = sharding_lib.batch_sharding(mesh)
    n = int(config.global_batch_size)
    return {"latent": jax.ShapeDtypeStruct((n, *latent_shape), jnp.float32, sharding=s),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=s)}
