"""Experiment drivers, aggregation, plots and benchmark scripts, installed as llmsp.sweeps."""
