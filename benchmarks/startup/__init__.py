"""Start-up benchmark: a 2-rank job unguarded, guarded with a manifest, guarded with RECORD."""
