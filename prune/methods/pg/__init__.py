"""Policy-gradient structured pruning (Gao et al., "Bypass Back-propagation: Optimization-based Structural
Pruning for Large Language Models via Policy Gradient"): Bernoulli keep-probabilities per unit, REINFORCE
updates from forward passes only, projection onto the parameter budget. See optimizer.py for the method."""
