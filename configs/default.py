"""Shared defaults: the official DiCo training recipe (ImageNet latents, AdamW, EMA 0.9999).

Other configs import `get_config()` from here and override what differs. Every field can be
overridden on the command line, e.g. `--config.learning_rate=2e-4 --config.mesh.fsdp=4`.
"""
from typing import Any

import ml_collections
from ml_collections import config_dict

from dico_jax.models import MODEL_NAMES

# The scales of the model zoo (DiCo-S ... DiCo-H) and the resolutions of the paper.
SCALES = tuple(name.removeprefix("DiCo-") for name in MODEL_NAMES)
RESOLUTIONS = (256, 512)

# The arguments `get_config` takes (none): tests/test_configs.py checks each config file's.
PRESETS = ("",)

_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """A config argument such as "XL,res=512" as a dict over `defaults`' keys.

    A bare word names a boolean key (which it sets) or else sets the first key; `key=value`
    sets that key, converted to the type of its default. Unknown keys and unconvertible values
    name the argument.
    """
    values = dict(defaults)
    first = next(iter(defaults))
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, eq, text = part.partition("=")
        if not eq and isinstance(defaults.get(part), bool):
            values[part] = True
            continue
        if not eq:
            key, text = first, part
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; valid: {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            values[key] = _BOOLS[text.lower()] if kind is bool else kind(text)
        except (ValueError, KeyError):
            raise ValueError(f"config arg {key}={text!r} in {arg!r} is not "
                             f"{_KIND_NAMES.get(kind, kind.__name__)}") from None
    return values


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.seed = 0
    config.global_batch_size = 256
    config.num_train_steps = 400_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 50_000
    config.keep_checkpoints = 3
    # The longest a checkpoint save may take before the run stops (Orbax's default): what a
    # save blocked by an unreachable bucket waits, once the storage layers' retries are spent.
    config.checkpoint_timeout_secs = 1200
    # Checkpoints at multiples of this many steps are never deleted (0: none): the points of
    # a scaling curve, evaluated during the run or afterwards.
    config.keep_every_steps = 50_000
    # A grid of samples every this many steps (latent runs decode it with `vae_weights`);
    # 0 disables.
    config.sample_every_steps = 0
    # Also write a grid after the last step.
    config.sample_at_end = False

    # Each step's global batch as this many micro-batches, their gradients accumulated in one
    # jitted step: the update of the whole batch with the activation memory of one micro-batch.
    config.grad_accum_steps = 1

    # Optimizer: AdamW, constant learning rate after an optional linear warmup.
    config.learning_rate = 1e-4
    config.warmup_steps = 0
    config.grad_clip_norm = 0.0  # global-norm clipping; 0 disables
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.weight_decay = 0.0
    config.ema_decay = 0.9999

    # Compute dtype of the network ("float32" or "bfloat16"); parameters, optimizer state and
    # the loss stay float32.
    config.dtype = "float32"
    # Rematerialization of each block: "none", "full", "dots", "dots_no_batch", or "linear"
    # (keep the outputs of the block's linear maps, recompute its element-wise ops).
    config.remat = "none"

    # Device mesh: axis sizes, -1 takes the devices left over. `slice` spans the slices of a
    # multislice job (data parallel over the data-center network; 0: one per slice), `data`
    # and `fsdp` lie inside each slice. Parameters with at least `fsdp_min_size` elements
    # are split along `fsdp`; the batch is split over all three axes.
    config.mesh = ml_collections.ConfigDict({"slice": 0, "data": -1, "fsdp": 1})
    config.fsdp_min_size = 2**18

    # The network: `name` picks the official widths/depths; a field left None keeps the
    # default of that model (in_channels / out_channels / num_classes follow the data).
    config.model = ml_collections.ConfigDict()
    config.model.name = "DiCo-XL"
    config.model.hidden_size = config_dict.placeholder(int)
    config.model.depths = config_dict.placeholder(tuple)
    config.model.mlp_ratio = config_dict.placeholder(float)
    config.model.in_channels = config_dict.placeholder(int)
    config.model.out_channels = config_dict.placeholder(int)
    config.model.num_classes = config_dict.placeholder(int)
    config.model.class_dropout_prob = 0.1
    # Each level's blocks as one `lax.scan` (compile time independent of depth), or with False
    # as a Python loop: longer compiles, faster steps, since the scan stores every block's
    # residuals in stacked buffers (docs/performance.md).
    config.model.scan = True
    # Depthwise 3x3: "auto" (shifted multiply-adds on CPU, grouped conv elsewhere), "conv", "shift".
    config.model.depthwise_impl = "auto"
    # Layer norms: "xla" (fused by the compiler), "pallas" (one-pass GPU kernels,
    # dico_jax/models/kernels/), "pallas_interpret" (those kernels interpreted: checks).
    config.model.norm_impl = "xla"

    # Input: a latent dataset written by `dico_jax.data` (manifest.json + ArrayRecord shards).
    config.data = ml_collections.ConfigDict()
    config.data.dir = ""
    # "digits": with an empty `dir`, build the built-in digits dataset under the workdir.
    config.data.builtin = ""
    config.data.random_flip = True
    config.data.worker_count = 0
    # Image resolution; the latents are resolution / 8 (SD VAE) per side.
    config.resolution = 256

    # The objective: "ddpm" (the official DiCo/DiT one) or "flow" (flow matching, SiT's
    # interpolants; dico_jax/diffusion/flow.py). Flow matching learns no variance: set
    # learn_sigma=False with it (the network then outputs in_channels).
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.kind = "ddpm"
    config.diffusion.steps = 1000
    config.diffusion.noise_schedule = "linear"
    config.diffusion.learn_sigma = True
    # kind="flow": the path ("linear", "gvp"), what the network predicts ("velocity",
    # "noise", "score"), the training-time distribution ("uniform", or "logit_normal" with
    # logit_mean / logit_std, t = 1 being data), SD3's time shift (> 1 moves time towards
    # noise; also applied to the sampler's time grid), and SiT's eps (None: 0 for velocity,
    # 1e-3 for noise and score).
    config.diffusion.flow = ml_collections.ConfigDict()
    config.diffusion.flow.path = "linear"
    config.diffusion.flow.prediction = "velocity"
    config.diffusion.flow.time_sampling = "uniform"
    config.diffusion.flow.logit_mean = 0.0
    config.diffusion.flow.logit_std = 1.0
    config.diffusion.flow.shift = 1.0
    config.diffusion.flow.train_eps = config_dict.placeholder(float)
    config.diffusion.flow.sample_eps = config_dict.placeholder(float)
    # The samplers' own time shift (None: `shift`; LightningDiT shifts sampling only) and
    # the weight of LightningDiT's velocity-direction loss 1 - cos(output, target) (0: off).
    config.diffusion.flow.sample_shift = config_dict.placeholder(float)
    config.diffusion.flow.cosine_weight = 0.0
    # kind="meanflow" (arXiv 2505.13447, dico_jax/diffusion/meanflow.py) and kind="shortcut"
    # (arXiv 2410.12557, dico_jax/diffusion/shortcut.py): few-step objectives whose network
    # takes a second time input. Fields left None keep the papers' values: MeanFlow's
    # logit-normal (r, t) (logit_mean, logit_std), the share of r != t (ratio_r_neq_t), the
    # adaptive weighting (adaptive_p, adaptive_c) and the guidance folded into the target
    # (cfg_omega, cfg_kappa; 1 and 0 train without it); the shortcut model's finest step
    # 1 / denoise_steps, the one row in bootstrap_every that trains self-consistency, and
    # whether the EMA weights make those targets (ema_teacher).
    config.diffusion.meanflow = ml_collections.ConfigDict()
    for field in ("logit_mean", "logit_std", "ratio_r_neq_t", "adaptive_p", "adaptive_c",
                  "cfg_omega", "cfg_kappa"):
        config.diffusion.meanflow[field] = config_dict.placeholder(float)
    config.diffusion.shortcut = ml_collections.ConfigDict()
    config.diffusion.shortcut.denoise_steps = config_dict.placeholder(int)
    config.diffusion.shortcut.bootstrap_every = config_dict.placeholder(int)
    config.diffusion.shortcut.ema_teacher = config_dict.placeholder(bool)

    # Sampling: the FID protocol (250 ancestral steps, EMA weights, CFG on 3 eps channels);
    # the training-time grids use the same settings with `grid_per_class` images per class.
    # Samplers (dico_jax.diffusion.SAMPLERS): "ddpm", "ddim" or "ddimN" for kind="ddpm",
    # which take `respacing` (the kept DDPM steps); "euler", "heun" (ODE) or "euler_maruyama"
    # (SDE) for kind="flow", which take `num_steps` (solver steps; Heun evaluates the network
    # twice per step, Euler-Maruyama counts its last step among them); "meanflow" and
    # "shortcut" for their kinds, one network evaluation per step of `num_steps` (a power of
    # two for shortcut models). Empty: the objective's own, "ddpm" for kind="ddpm", "heun"
    # for kind="flow", the few-step sampler of kind="meanflow" or "shortcut".
    config.sampling = ml_collections.ConfigDict()
    config.sampling.sampler = ""
    config.sampling.respacing = "250"
    config.sampling.num_steps = 50
    config.sampling.cfg_scale = 1.5
    config.sampling.guidance_channels = 3
    # Guidance only for flow times low <= t <= high (0 noise, 1 data), for every sampler: the
    # DDPM/DDIM ones guide the steps of matching signal-to-noise ratio (on the flow path of
    # config.diffusion.flow, linear by default). Empty: guidance at every step.
    config.sampling.guidance_interval = ()
    # Euler-Maruyama: SiT's diffusion coefficient ("sigma", "SBDM", "constant", "linear",
    # "decreasing", "increasing-decreasing") times `diffusion_norm`, and the deterministic
    # last step ("mean", "euler" or "none") of size `last_step_size` that ends at t = 1.
    config.sampling.sde = ml_collections.ConfigDict()
    config.sampling.sde.diffusion_form = "sigma"
    config.sampling.sde.diffusion_norm = 1.0
    config.sampling.sde.last_step = "mean"
    config.sampling.sde.last_step_size = 0.04
    config.sampling.num_samples = 50_000
    # Global batch of `python -m dico_jax.sample`, a multiple of the device count (0: 32 per
    # device), and its labels: "" for uniform random classes, or a comma list ("1,2,3") cycled.
    config.sampling.batch_size = 0
    config.sampling.labels = ""
    config.sampling.grid_classes = 10
    config.sampling.grid_per_class = 8

    # Diffusers AutoencoderKL weights (a file or folder) that decode a latent run's samples:
    # its training grids, and its evaluations unless `eval.vae_weights` names others.
    config.vae_weights = ""
    # Which VAE the latents are of: "sd-vae" (latents x 0.18215) or "va-vae" (LightningDiT's
    # f16d32, latents normalised per channel with the statistics in the dataset's manifest).
    # Training refuses latents of the other kind.
    config.vae = "sd-vae"

    # Evaluation during training (dico_jax.evaluation.during_training): every `every_steps`
    # (0: never; a multiple of checkpoint_every_steps) the EMA weights draw `num_samples`
    # images, labels spread evenly over the classes and the same noise at every evaluation,
    # scored against `reference`; results in workdir/eval/<step>.json and TensorBoard eval/*.
    # The defaults are the paper's scaling-table protocol: 250 DDPM steps, no guidance. The
    # sampler takes `respacing` or `num_steps` as in `config.sampling`; empty, it follows the
    # objective: "ddpm" for kind="ddpm", and for kind="flow" Heun with `num_steps`=125
    # (250 network evaluations, the cost of the DDPM protocol).
    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 0
    config.eval.num_samples = 10_000
    config.eval.batch_size = 0  # global, a multiple of the device count (0: 32 per device)
    config.eval.sampler = ""
    config.eval.respacing = "250"
    config.eval.num_steps = 125
    config.eval.cfg_scale = 1.0
    config.eval.guidance_channels = 3
    # Latent runs: the ADM reference batch (VIRTUAL_imagenet256_labeled.npz), the pytorch-fid
    # Inception weights (pt_inception-2015-12-05-6726825d.pth) and the VAE ("" takes
    # config.vae_weights). The built-in digits need none of them.
    config.eval.reference = ""
    config.eval.inception_weights = ""
    config.eval.vae_weights = ""

    # Peak FLOP/s of one chip for perf/mfu where the chip is not in the built-in table
    # (e.g. CPU).
    config.peak_flops = 1e12

    # JAX's persistent compilation cache (local or gs://): a restarted run loads its compiled
    # programs instead of compiling them again. "" keeps a folder JAX was given
    # (JAX_COMPILATION_CACHE_DIR), else uses <workdir>/compilation_cache; "off" disables it.
    config.compilation_cache_dir = ""
    # Trace steps [first, first + count) with jax.profiler on process 0, into
    # <workdir>/plugins/profile/ where TensorBoard's profile plugin finds them; (0, 0): none.
    config.profile = (0, 0)

    # Write every step's loss to `losses.jsonl` in the workdir (for resumption checks).
    config.debug_log_losses = False
    # Fine-tuning: a checkpoint directory (a training workdir, or one written by
    # `python -m dico_jax.convert from-torch`) whose params and EMA start a fresh run (step 0,
    # fresh optimizer). Ignored when the workdir already has a checkpoint to resume from.
    config.init_from = ""

    return config


def use_flow(config: ml_collections.ConfigDict, time_sampling: str = "uniform") -> None:
    """Switches `config` to flow matching as SiT trains it: linear path, velocity prediction,
    no learned variance (the presets that train by flow share this)."""
    config.diffusion.kind = "flow"
    config.diffusion.learn_sigma = False
    config.diffusion.flow.path = "linear"
    config.diffusion.flow.prediction = "velocity"
    config.diffusion.flow.time_sampling = time_sampling


def use_few_step(config: ml_collections.ConfigDict, kind: str, num_steps: int = 1) -> None:
    """Switches `config` to a few-step objective, "meanflow" or "shortcut" (their papers'
    settings), sampled and evaluated in `num_steps` network evaluations."""
    if kind not in ("meanflow", "shortcut"):
        raise ValueError(f"few-step kind must be 'meanflow' or 'shortcut', got {kind!r}")
    config.diffusion.kind = kind
    config.diffusion.learn_sigma = False
    config.sampling.sampler = ""
    config.sampling.num_steps = num_steps
    config.eval.sampler = ""
    config.eval.num_steps = num_steps
