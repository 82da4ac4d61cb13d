"""Which DiCo configuration is the one of the paper's Table 13 (LightningDiT's setup:
16x16x32 VA-VAE latents, 679M parameters, 118.3 GFLOPs)?

The paper's "GFLOPs" are multiply-accumulates: its Table 6 figures are half of XLA's forward
FLOP count for the zoo at 32x32x4 (README, model zoo). This script counts, for every width
C, mlp ratio and symmetric depth pattern (d1, d2, d3, d2, d1) on a grid, the exact parameter
count (from the module's parameter shapes) and the forward MACs (every weight applied at
every position of its level; the per-image conditioning, adaLN and channel attention, once),
checks the MAC count against the paper's zoo figures, and prints the nearest configurations.

    python bench/table13_search.py [--positions 16] [--top 15]
"""
from __future__ import annotations

import argparse
import functools
import itertools

import jax

from dico_jax.models import MODEL_CONFIGS, abstract_params, get_model

TARGET_PARAMS, TARGET_GMACS = 679e6, 118.3
PAPER_GMACS_32 = {"DiCo-S": 4.25, "DiCo-B": 16.88, "DiCo-L": 60.24, "DiCo-XL": 87.30}
# Where each weight runs: 1 full resolution, 4 half, 16 quarter (positions divided by this).
_LEVEL = (("encoder_level_1", 1), ("decoder_level_1", 1), ("x_embedder", 1), ("final_layer/out_proj", 1),
          ("down1_2", 1), ("reduce_chan_level1", 1), ("encoder_level_2", 4), ("decoder_level_2", 4),
          ("down2_3", 4), ("up2_1", 4), ("reduce_chan_level2", 4), ("latent", 16), ("up3_2", 16))
_PER_IMAGE = ("adaLN_modulation", "t_embedder", "y_embedder", "/ca/")
_STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


@functools.lru_cache(maxsize=None)
def _parts(hidden: int, mlp_ratio: float, channels: int):
    """(fixed params, fixed MACs per full-res position, per-block params and MACs per stage)
    from one shape evaluation with one block per stage."""
    model = get_model("DiCo-S", hidden_size=hidden, depths=(1,) * 5, mlp_ratio=mlp_ratio,
                      in_channels=channels, learn_sigma=False)
    fixed_p = fixed_m = 0.0
    block_p, block_m = [0.0] * 5, [0.0] * 5
    for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(model, 16, 16))[0]:
        name = "/".join(k.key for k in keys) + "/"
        size = float(leaf.size)
        macs = 0.0
        if name.endswith("kernel/") and not any(s in name for s in _PER_IMAGE):
            macs = size / next(div for prefix, div in _LEVEL if name.startswith(prefix))
        stage = next((i for i, s in enumerate(_STAGES) if name.startswith(s + "/")), None)
        if stage is None:
            fixed_p, fixed_m = fixed_p + size, fixed_m + macs
        else:
            block_p[stage] += size
            block_m[stage] += macs
    return fixed_p, fixed_m, tuple(block_p), tuple(block_m)


def count(hidden, depths, mlp_ratio, channels=32, positions=16):
    """(parameters, forward GMACs) at a positions x positions latent grid."""
    fixed_p, fixed_m, block_p, block_m = _parts(hidden, mlp_ratio, channels)
    params = fixed_p + sum(d * p for d, p in zip(depths, block_p))
    macs = fixed_m + sum(d * m for d, m in zip(depths, block_m))
    return params, macs * positions**2 / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=16, help="latent side the network runs at")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    print("check against the paper's zoo (32x32x4):")
    for name, gmacs in PAPER_GMACS_32.items():
        cfg = MODEL_CONFIGS[name]
        params, ours = count(cfg["hidden_size"], cfg["depths"], cfg["mlp_ratio"], 4, 32)
        print(f"  {name}: {params / 1e6:8.1f}M params (with 4 output channels), "
              f"{ours:7.2f} GMACs, paper {gmacs:.2f} ({ours / gmacs - 1:+.1%})")

    rows = []
    for hidden, ratio in itertools.product(range(256, 1025, 32), (2.0, 4.0)):
        for d1, d2, d3 in itertools.product(range(1, 21), repeat=3):
            params, gmacs = count(hidden, (d1, d2, d3, d2, d1), ratio, 32, args.positions)
            if abs(params / TARGET_PARAMS - 1) < 0.1:
                miss = max(abs(params / TARGET_PARAMS - 1), abs(gmacs / TARGET_GMACS - 1))
                rows.append((miss, hidden, ratio, (d1, d2, d3, d2, d1), params, gmacs))
    rows.sort()
    print(f"\nnearest to {TARGET_PARAMS / 1e6:.0f}M params and {TARGET_GMACS} GMACs at "
          f"{args.positions}x{args.positions}x32 (worst of the two relative misses):")
    print("  miss    C  mlp  depths              params    GMACs")
    for miss, hidden, ratio, depths, params, gmacs in rows[: args.top]:
        print(f"  {miss:5.1%} {hidden:4d} {ratio:4.0f}  {str(depths):18s} {params / 1e6:7.1f}M {gmacs:8.2f}")
    max_gmacs = max((r[5] for r in rows), default=0.0)
    print(f"\nmost GMACs of any grid configuration within 10% of the parameter count: {max_gmacs:.1f}")


if __name__ == "__main__":
    main()
