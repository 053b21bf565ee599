"""phalanx: distributed training with elastic fault tolerance, on torch.distributed."""

__version__ = "0.1.0"
