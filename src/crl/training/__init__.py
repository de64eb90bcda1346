"""What one training run is: its Recipe, its batch sampler and the fingerprints
that name its data, indices and architecture. The loops that run it are
crl.engine (`crl.engine.fit` is the sequential one)."""
