"""Evaluation: pairwise judge win rates, held-out reward and language fidelity, reports."""
