"""The scaling sweep: which DiCo runs reproduce the paper's curves, and when each is evaluated.

    from configs import sweep
    cfg = sweep.get_config()          # the paper's sweep: S, B, L, XL, H at 256 and 512
    cfg = sweep.get_config("smoke")   # every scale for a few steps at tiny batch (CPU path check)
    for run in sweep.run_specs(cfg, "gs://BUCKET/sweep"):
        ...  # run["config"], run["workdir"], run["overrides"] -> launch/tpu.py train

Every run trains `configs/dico.py:<scale>,res=<res>` (official recipe: AdamW 1e-4, batch 256,
EMA 0.9999) for `num_train_steps`; the paper compares scales at 400K steps with FID-50K,
no guidance (S 49.97, B 27.20, L 13.66, XL 11.67 at 256). Along the way a cheaper FID-10K
every `eval_every_steps` traces the curve. The official DiCo-XL 256 run went on to about
4.06M steps (`long_runs`). `python -m dico_jax.tools.scaling --runs <workdirs>` plots the
result over the official logs.
"""
import ml_collections

from configs.default import RESOLUTIONS, SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = (arg or "paper").strip()
    if variant not in ("paper", "smoke"):
        raise ValueError(f"unknown sweep {variant!r}; valid: paper, smoke")
    cfg = ml_collections.ConfigDict()
    cfg.name = variant
    cfg.scales = SCALES
    cfg.resolutions = RESOLUTIONS
    cfg.config_file = "configs/dico.py"
    cfg.global_batch_size = 256
    cfg.num_train_steps = 400_000
    cfg.log_every_steps = 100
    cfg.checkpoint_every_steps = 50_000
    # Evaluation points: FID-10K every 50K steps, FID-50K at the end (the paper's table).
    cfg.eval_every_steps = 50_000
    cfg.eval_num_samples = 10_000
    cfg.final_eval_num_samples = 50_000
    cfg.eval_cfg_scale = 1.0  # the scaling table is without classifier-free guidance
    cfg.eval_sampling_steps = 250
    # Longer runs beyond the sweep: the official DiCo-XL 256 run length.
    cfg.long_runs = ml_collections.ConfigDict({"XL_256": 4_060_000})
    if variant == "smoke":
        # Every scale at full width for a few steps: enough loss points to plot, on a CPU.
        cfg.resolutions = (256,)
        cfg.global_batch_size = 8
        cfg.num_train_steps = 4
        cfg.log_every_steps = 1
        cfg.checkpoint_every_steps = 4
        cfg.eval_every_steps = 0
        cfg.eval_num_samples = 0
        cfg.final_eval_num_samples = 0
        cfg.long_runs = ml_collections.ConfigDict()
    return cfg


def eval_steps(cfg: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """(step, number of FID samples) for every evaluation point of one run, in order."""
    points = []
    if cfg.eval_every_steps:
        points = [(s, cfg.eval_num_samples)
                  for s in range(cfg.eval_every_steps, cfg.num_train_steps, cfg.eval_every_steps)]
    if cfg.final_eval_num_samples:
        points.append((cfg.num_train_steps, cfg.final_eval_num_samples))
    return points


def run_specs(cfg: ml_collections.ConfigDict, root: str) -> list[dict]:
    """One entry per (scale, resolution): the trainer's config argument, workdir and overrides."""
    specs = []
    for res in cfg.resolutions:
        for scale in cfg.scales:
            arg = scale if res == 256 else f"{scale},res={res}"
            specs.append({
                "name": f"dico-{scale.lower()}-{res}",
                "config": f"{cfg.config_file}:{arg}",
                "workdir": f"{root.rstrip('/')}/dico-{scale.lower()}-{res}",
                "overrides": [
                    f"--config.global_batch_size={cfg.global_batch_size}",
                    f"--config.num_train_steps={cfg.num_train_steps}",
                    f"--config.log_every_steps={cfg.log_every_steps}",
                    f"--config.checkpoint_every_steps={cfg.checkpoint_every_steps}",
                ],
                "eval_steps": eval_steps(cfg),
            })
    return specs
