"""What a worker runs: the rank layout, data-parallel training, (later) pipeline, TP, ZeRO."""
