"""Ray Serve application builders and YAML configs (see deployments/app.py)."""
