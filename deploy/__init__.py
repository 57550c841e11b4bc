"""Deployment helpers: the nginx config renderer and the load-balancer proof (deploy/proof.py)."""
