"""Job-script templates shipped with pvw-hpc (a package only so the wheel carries them)."""
