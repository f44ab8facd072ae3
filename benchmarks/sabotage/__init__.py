"""Sabotage benchmark: a real distributed training job and the attacks from the incident.

``python -m benchmarks.sabotage run [--guard on|off] [--attack NAME|all] [--repeat N]
[--steps S] --out DIR`` runs the reference job (job.py) clean and under each attack
scenario (scenarios.py) and writes ``DIR/results.json``; see README.md.
"""
