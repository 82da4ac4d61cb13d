"""Command-line tools that read training outputs: scaling curves."""
