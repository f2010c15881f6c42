"""How a survivor sends its stage: large tensors as they are (no second copy of the stage), small ones in
buckets, and the receiver reassembles exactly what was sent from the same specs."""
from __future__ import annotations

import torch

from deepspeed_checkfree.pipe.exchange import _empty_messages, _pack, _unpack, wire_messages


def test_large_tensors_travel_alone_and_small_ones_share_buckets_per_dtype():
    f32, bf16 = torch.float32, torch.bfloat16
    specs = [((256,), f32), ((1024, 1024), f32), ((128,), bf16), ((512,), f32), ((2048, 2048), bf16), ((64,), bf16)]
    messages = wire_messages(specs, bucket_bytes=4 * 2**20)
    assert [1] in messages and [4] in messages, "4 MiB and 8 MiB tensors travel alone"
    assert [0, 3] in messages and [2, 5] in messages, "small tensors share one bucket per dtype"
    assert sorted(i for m in messages for i in m) == list(range(len(specs)))
    assert all(len({specs[i][1] for i in m}) == 1 for m in messages)


def test_a_bucket_never_exceeds_its_size():
    specs = [((1000,), torch.float32)] * 10  # 4000 bytes each
    messages = wire_messages(specs, bucket_bytes=10_000)
    assert [len(m) for m in messages] == [2, 2, 2, 2, 2]


def test_pack_sends_a_large_tensor_without_copying_it_and_unpack_restores_every_tensor():
    tensors = [torch.randn(300), torch.randn(600, 600), torch.randn(50).to(torch.bfloat16), torch.randn(7, 3)]
    specs = [(tuple(t.shape), t.dtype) for t in tensors]
    messages = list(_pack(tensors, bucket_bytes=2**20))
    assert any(m.data_ptr() == tensors[1].data_ptr() for m in messages), "the 1.4 MB tensor itself is the message"
    received = _empty_messages(specs, torch.device("cpu"), bucket_bytes=2**20)
    assert [b.numel() for b in received] == [m.numel() for m in messages]
    for buf, msg in zip(received, messages):
        buf.copy_(msg)
    out = _unpack(received, specs, bucket_bytes=2**20)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(tensors, out))


def test_an_optimizer_state_splits_into_a_skeleton_and_its_own_tensors_and_fills_back_exactly():
    from deepspeed_checkfree.pipe.exchange import TensorSlot, fill_state, split_state

    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    state = opt.state_dict()
    skeleton, tensors = split_state(state, torch.device("cpu"))
    moments = [t for s in state["state"].values() for k, t in s.items() if k != "step"]
    assert all(any(t.data_ptr() == m.data_ptr() for t in tensors) for m in moments), "the moments, not copies"
    assert isinstance(skeleton["state"][0]["exp_avg"], TensorSlot) and skeleton["param_groups"] == state["param_groups"]
    slots = [v for s in skeleton["state"].values() for v in s.values() if isinstance(v, TensorSlot)]
    assert sorted(slot.index for slot in slots) == list(range(len(tensors)))
    refilled = fill_state(skeleton, [t.clone() for t in tensors])
    fresh = torch.optim.Adam(torch.nn.Linear(8, 4).parameters(), lr=0.1)
    fresh.load_state_dict(refilled)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A tensor on another device than the wire's (Adam's step counters beside GPU moments) stays in the skeleton.
    skeleton, tensors = split_state(state, torch.device("meta"))
    assert tensors == [] and torch.equal(skeleton["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
