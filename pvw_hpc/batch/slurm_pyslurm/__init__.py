"""SLURM through pyslurm, libslurm's Python binding, in the launcher's process: ``"access": "pyslurm"``."""
