"""Explanations of features: explainers that write them, scorers that test them, one run."""
