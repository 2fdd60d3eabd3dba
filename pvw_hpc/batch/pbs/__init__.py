"""PBS Pro and Torque through ``qsub``/``qstat``/``qdel``: ``"scheduler": "pbs"`` with a ``flavor``."""
