"""Ray adapters: the only package (with deployments/) that imports Ray."""
