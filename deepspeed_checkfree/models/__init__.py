"""The demo models (a small GPT and a LLaMA-style model as DeepSpeed ``PipelineModule``s) and the shipped corpus
loader. Examples of how to build models for CheckFree, not part of the engine."""
