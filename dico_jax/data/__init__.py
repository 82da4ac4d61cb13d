"""Latent datasets: the record format, the built-in digits, extraction and the Grain pipeline.

Submodules: `records` (shards and manifest), `digits` (built-in dataset), `pipeline` (Grain
input), `imagenet` (image sources and the ADM crop), `extract` (the extraction command).
"""


def __getattr__(name):
    # Lazy, so `python -m dico_jax.data.records` does not find its module imported already.
    if name in ("DataFormatError", "Manifest", "read_manifest", "validate_dataset"):
        from dico_jax.data import records

        return getattr(records, name)
    raise AttributeError(f"module 'dico_jax.data' has no attribute {name!r}")


__all__ = ["DataFormatError", "Manifest", "read_manifest", "validate_dataset"]
