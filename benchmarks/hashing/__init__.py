"""Hashing benchmark: trainguard's verify-env over the installed torch vs sha256sum/b3sum."""
