"""The DeepSpeed side: the CheckFree ``PipelineEngine`` and its parts, the CheckFree+ module layout, moving a
stage's weights between ranks, and every private DeepSpeed name the package relies on (:mod:`.ds_internals`)."""
