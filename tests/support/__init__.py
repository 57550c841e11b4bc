"""What tests and benchmarks share: drawn images, one service launcher, reading /metrics. Product code never imports it."""
