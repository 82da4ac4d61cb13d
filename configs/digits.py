"""A small DiCo on the built-in 8x8 digits: trains on a laptop CPU in minutes.

    python -m dico_jax.main --config=configs/digits.py --workdir=/tmp/digits
    python -m dico_jax.main --config=configs/digits.py:flow --workdir=/tmp/digits_flow

builds the dataset under the workdir, trains, and writes `samples.png` there: one row per
digit class, sampled from the EMA weights with classifier-free guidance. The argument `flow`
trains the same network for the same steps by flow matching (linear path, velocity
prediction) and samples with a few Heun steps instead of 100 DDPM steps. `meanflow` and
`shortcut` train the few-step objectives and sample in one network evaluation
(`--config.sampling.num_steps=2` or 4 for more).
"""
from configs import default

# Every argument this file documents (tests/test_configs.py checks each one's config).
PRESETS = ("", "flow", "meanflow", "shortcut")


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, flow=False, meanflow=False, shortcut=False)
    config = default.get_config()
    config.model.name = "DiCo-S"
    config.model.hidden_size = 32
    config.model.depths = (1, 1, 1, 1, 1)
    config.resolution = 8

    config.data.builtin = "digits"
    # Digits are not mirror-symmetric: a flipped "2" is not a "2".
    config.data.random_flip = False

    # A short run on a tiny model wants a larger step size and a shorter EMA.
    config.global_batch_size = 64
    config.num_train_steps = 1500
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.ema_decay = 0.995
    config.log_every_steps = 100
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    config.fsdp_min_size = 2**14

    # The run evaluates itself: a quality curve of the digits' feature-network FID, IS,
    # precision, recall and accuracy (no guidance, 25 DDPM steps over one batch of 1,000:
    # the computation of about 130 training steps), from checkpoints kept at the same steps.
    config.eval.every_steps = 500
    config.eval.num_samples = 1000
    config.eval.batch_size = 1000
    config.eval.respacing = "25"
    config.eval.num_steps = 13  # flow: Heun-13, 26 network evaluations
    config.eval.guidance_channels = 1
    config.keep_every_steps = 500

    config.sample_at_end = True
    config.sampling.respacing = "100"
    config.sampling.cfg_scale = 3.0
    config.sampling.guidance_channels = 1  # digits have one channel: guide all of it
    config.sampling.grid_per_class = 10
    # `sample` draws 1,000 images by default, minutes on a CPU (the FIDs quoted for digits use
    # 1,000); --config.sampling.num_samples=50000 for more.
    config.sampling.num_samples = 1000

    if args["flow"]:
        default.use_flow(config, time_sampling="logit_normal")
        config.sampling.sampler = "heun"
        config.sampling.num_steps = 25  # 50 network evaluations
        config.sampling.cfg_scale = 3.0
    if args["meanflow"] and args["shortcut"]:
        raise ValueError(f"config arg {arg!r}: meanflow and shortcut are separate presets")
    if args["meanflow"] or args["shortcut"]:
        if args["flow"]:
            raise ValueError(f"config arg {arg!r}: flow is its own preset")
        default.use_few_step(config, "meanflow" if args["meanflow"] else "shortcut")
    if args["meanflow"]:
        # Guidance trained into the target (Eq. 13-16 of the paper, omega = 2): one network
        # evaluation per guided step, so sampling adds none.
        config.diffusion.meanflow.cfg_omega = 2.0
        config.sampling.cfg_scale = 1.0
    if args["shortcut"]:
        # The self-consistency targets from the online weights: on a run this short the EMA
        # teacher lags behind (1-step FID 382 with it, 3.2 without: docs/fewstep.md).
        config.diffusion.shortcut.ema_teacher = False
        config.sampling.cfg_scale = 1.0
    return config
