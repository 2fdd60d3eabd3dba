"""HTCondor through its official Python bindings (``htcondor2``): ``"scheduler": "htcondor"``."""
