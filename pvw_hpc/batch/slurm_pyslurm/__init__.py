"""SLURM through pyslurm, libslurm's Python binding, in a worker process of the launcher: ``"access": "pyslurm"``."""
