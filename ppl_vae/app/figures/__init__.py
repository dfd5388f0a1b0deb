"""Figures: one module per subject (a run, gaps, VI vs MCMC, the latent space, gradients); each function returns a matplotlib ``Figure``."""
