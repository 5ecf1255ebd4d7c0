"""Network building blocks: the categorical VAE, the causal Transformer and the heads."""
