"""Exits: signals, exit policies, the exit rule with its sweeps and Pareto fronts, speed-up and
exit metrics, and held-out operating points. Pure maths over cached logits [N, M, C]."""
