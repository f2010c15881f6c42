"""Pure decisions and rules, with no process group and no engine: the "checkfree" config section, recovery plans
and blends, the CheckFree+ schedule, failure plans and rejoin decisions. Nothing here imports torch.distributed,
DeepSpeed's engine or Megatron (enforced by tests/unit/test_architecture.py)."""
