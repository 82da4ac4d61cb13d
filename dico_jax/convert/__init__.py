"""Weight conversion between the official PyTorch models and ours.

`python -m dico_jax.convert` imports and exports whole checkpoints; these functions work
on in-memory weights.
"""
from dico_jax.convert.dico import (flax_to_torch, key_map, load_torch_checkpoint,
                                   official_shapes, torch_to_flax)


def __getattr__(name):
    # The VAE converter pulls in the VAE module; import it only when asked for.
    if name in ("vae_torch_to_flax", "vae_flax_to_torch", "load_vae_weights"):
        from dico_jax.convert import vae

        return getattr(vae, name)
    raise AttributeError(f"module 'dico_jax.convert' has no attribute {name!r}")


__all__ = ["torch_to_flax", "flax_to_torch", "load_torch_checkpoint", "official_shapes",
           "key_map", "vae_torch_to_flax", "vae_flax_to_torch", "load_vae_weights"]
