"""Decoding: the one rollout engine and the path it samples along.

`paths` defines path shapes (how the two models' logits mix at alpha); `engine` (host part:
slots, handles, harvesting) over `engine_device` (pure jitted prefill, insert and generate on
donated state) is the one decoder; `sampler.PairedSampler` is its one-prompt API; `rollouts` holds
the pieces they share (rollout record, row keys, sampling step, validation, buckets);
`row_block` is the request (NumPy only); `memory` plans slots from the device's memory and
`sharding` places rows on devices.
"""
