"""Sequence lengths of batches and the long-sequence rule."""

from __future__ import annotations

import torch

from lightning_paged.core.eviction.seqlen import LongSequenceDetector, batch_length


def test_long_sequence_by_threshold():
    detect = LongSequenceDetector(threshold=2048)
    assert [detect(n) for n in (512, 2047, 2048, 4096, None)] == [False, False, True, True, False]


def test_long_sequence_by_running_90th_percentile():
    detect = LongSequenceDetector()
    history = [100, 120, 110, 130, 90, 100, 125, 105, 115, 500]
    assert [detect(n) for n in history] == [False] * 10  # too little history yet: nothing is flagged
    assert detect.cutoff() == 130  # nearest rank 9 of 10 sorted lengths
    assert detect(131)
    assert not detect(130)
    assert detect(600)


def test_batch_length_shapes():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    seq, tokens = batch_length({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    assert seq == 4 and int(tokens) == 5
    assert batch_length({"attention_mask": mask})[0] == 4
    assert batch_length((torch.zeros(3, 7), torch.zeros(3)))[0] == 7
    assert batch_length({"pixels": torch.zeros(2, 3)}) == (None, None)
    assert batch_length({"x": [1, 2, 3]}, seq_len_fn=lambda b: (len(b["x"]), 2)) == (3, 2)
