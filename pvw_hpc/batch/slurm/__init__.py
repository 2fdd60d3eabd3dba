"""SLURM through its commands (``sbatch``/``squeue``/``sacct``/``scancel``): ``"access": "cli"``, the default."""
