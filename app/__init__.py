"""featurescope: an explorer of the neurons and SAE features of transformer language models."""

__version__ = "0.1.0"
