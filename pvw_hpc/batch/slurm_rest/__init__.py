"""SLURM through slurmrestd's HTTP API with a JWT: ``"access": "rest"``, for a launcher outside the cluster."""
