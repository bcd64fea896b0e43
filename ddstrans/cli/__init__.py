"""Command-line entry points: ``ddstrans`` (argparse subcommands) and ``ddstrans-train`` (Hydra)."""
