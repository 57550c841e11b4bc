"""Reading one value from the service's /metrics, to watch its queues and counters from the outside."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric_value(client: httpx.Client, sample_name: str, **labels: str) -> float:
    """The sample's value, 0 when it does not exist yet."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
