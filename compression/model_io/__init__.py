"""Models in and out: resolving and loading a source model, walking its decoder layers (dense and MoE),
placing it on the job's device, exporting compressed-tensors checkpoints and loading them back."""
