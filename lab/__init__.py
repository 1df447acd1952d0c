"""lab: a Hydra-configured experiment lab for small language models."""
