"""pvw-hpc: a restart-safe ParaViewWeb/wslink launcher for single hosts and HPC clusters."""

__version__ = "0.1.0"
