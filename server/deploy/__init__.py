"""Deploying berth as a service, as EAS does: service configs (config.py), services on this machine
behind an Envoy gateway (local.py, envoy.py), and Kubernetes manifests (kubernetes.py). Never imports
the engine: a service is `berth serve` processes and the files that describe them."""
