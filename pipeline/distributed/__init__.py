"""Scale-out (docs/scale-out.md): stage shards on Ray actors, the trainer under torchrun (DDP / FSDP2).

    ray_runner.py   one backend replica per Ray actor; the driver dispatches shards and stays the only writer
    ddp.py          DistributedTrainer: each rank takes its slice of the global batch (DDP or FSDP2)
    checkpoint.py   full-state checkpoints (model, optimizer, step) that resume the same trajectory

Heavy imports (ray, torch.distributed) happen inside these modules, never at package import.
"""
