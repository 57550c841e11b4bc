"""siamcam service: explainable image similarity over HTTP."""
