"""dico-jax: DiCo, the diffusion ConvNet with compact channel attention, in JAX/Flax."""

__version__ = "0.1.0"
