"""Scoring getp outputs against reference outputs: eval.py (the command), metrics.py, bertscore.py."""
