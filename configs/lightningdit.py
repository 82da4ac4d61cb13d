"""DiCo in LightningDiT's setup (the DiCo paper's Table 13): VA-VAE f16d32 latents
(16x16x32 at 256x256), normalised per channel, trained by flow matching with LightningDiT's
recipe.

    python -m dico_jax.data.extract --vae va-vae --vae_weights vavae-f16d32/ \\
        --source folder:/data/imagenet/train --out /data/latents-vavae
    python -m dico_jax.main --config=configs/lightningdit.py --workdir=gs://bucket/dico-lightningdit \\
        --config.data.dir=/data/latents-vavae --config.vae_weights=vavae-f16d32/

The DiCo paper gives nothing of this setup but the model's size (679M parameters, 118.3
GFLOPs), 800 epochs and that it follows LightningDiT; every training and sampling value below
is LightningDiT's, cited as file: field of hustvl/LightningDiT (configs/ is
configs/reproductions/lightningdit_xl_vavae_f16d32_800ep_cfg.yaml unless said otherwise).
The network is the documented nearest to the paper's two figures (docs/lightningdit.md).
"""
from configs import default

# ImageNet-1k train images; 800 epochs at batch 1024 (DiCo paper, Table 13: 800 epochs).
IMAGENET_TRAIN = 1_281_167
EPOCHS = 800
PRESETS = ("",)


def get_config(arg: str | None = None):
    del arg
    config = default.get_config()

    # The network: DiCo-XL's width and MLP ratio with deeper outer levels,
    # 679.0M parameters on 16x16x32 (bench/table13_search.py, docs/lightningdit.md).
    config.model.name = "DiCo-XL"
    config.model.hidden_size = 416
    config.model.depths = (15, 10, 7, 10, 15)
    config.model.mlp_ratio = 2.0

    # Data: VA-VAE latents (vae: model_name vavae_f16d32, downsample_ratio 16) normalised
    # per channel (data: latent_norm true, latent_multiplier 1.0).
    config.vae = "va-vae"
    config.resolution = 256  # data: image_size
    config.data.random_flip = True  # extract_features.py stores both views; one drawn at random

    # Optimizer: AdamW, lr 2e-4, betas (0.9, 0.95), no weight decay (optimizer: lr, beta2;
    # train.py builds torch.optim.AdamW(weight_decay=0, betas=(0.9, beta2))), constant.
    config.global_batch_size = 1024  # train: global_batch_size
    config.learning_rate = 2e-4
    config.adam_b1 = 0.9
    config.adam_b2 = 0.95
    config.weight_decay = 0.0
    config.warmup_steps = 0
    # Gradient clipping: train.py clips to optimizer: max_grad_norm only when the config sets
    # it, and none of the released configs (config_details.yaml, the 64- and 800-epoch
    # reproductions) does; the DiCo paper is silent. Off, as released
    # (--config.grad_clip_norm=1.0 turns it on).
    config.grad_clip_norm = 0.0
    config.ema_decay = 0.9999  # train.py: update_ema(decay=0.9999)
    config.num_train_steps = EPOCHS * IMAGENET_TRAIN // config.global_batch_size  # 1,000,911
    config.checkpoint_every_steps = 20_000  # train: ckpt_every
    config.keep_every_steps = 100_000
    config.dtype = "bfloat16"  # LightningDiT trains in bfloat16 (docs/tutorial.md)

    # Objective: linear path, velocity prediction, logit-normal times (transport: path_type
    # Linear, prediction velocity, use_lognorm true: sample_logit_normal(0, 1)), no eps.
    config.diffusion.kind = "flow"
    config.diffusion.learn_sigma = False
    config.diffusion.flow.path = "linear"
    config.diffusion.flow.prediction = "velocity"
    config.diffusion.flow.time_sampling = "logit_normal"
    config.diffusion.flow.logit_mean = 0.0
    config.diffusion.flow.logit_std = 1.0
    # Velocity-direction term 1 - cos(output, target) with weight 1 (transport:
    # use_cosine_loss true; train.py adds cos_loss.mean() to the mse).
    config.diffusion.flow.cosine_weight = 1.0
    # Training times unshifted; the sampler's grid shifted by timestep_shift 0.3, which is
    # SD3's shift 1/0.3 in this code's convention (sample: timestep_shift,
    # transport/integrators.py; dico_jax/diffusion/flow.py).
    config.diffusion.flow.shift = 1.0
    config.diffusion.flow.sample_shift = 1 / 0.3

    # Sampling: Euler ODE, 250 steps, CFG 6.7 on all 32 channels for flow times >= 0.125
    # (sample: mode ODE, sampling_method euler, num_sampling_steps 250, cfg_scale 6.7,
    # cfg_interval_start 0.125; LightningDiT guides every channel).
    config.sampling.sampler = "euler"
    config.sampling.num_steps = 250
    config.sampling.cfg_scale = 6.7
    config.sampling.guidance_channels = 32
    config.sampling.guidance_interval = (0.125, 1.0)
    config.eval.sampler = "euler"
    return config
