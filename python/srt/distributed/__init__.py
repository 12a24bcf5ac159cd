"""torch.distributed process groups and collectives for tensor and pipeline parallelism."""
