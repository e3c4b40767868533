"""The detector: the detection core and the runtimes that drive it."""
