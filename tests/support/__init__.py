"""What tests and benchmarks share: drawn images, one service launcher, model folders, reading /metrics.

Product code never imports it."""
