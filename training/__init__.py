"""Training floor: the synthetic world, and the training and evaluation of the embedded models."""
