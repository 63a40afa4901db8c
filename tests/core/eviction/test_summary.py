"""The end-of-run summary."""

from __future__ import annotations

from lightning_paged.core.eviction.summary import summarize


def _row(step: int, seq_len: int) -> dict:
    return {
        "step": step,
        "seq_len": seq_len,
        "tokens": seq_len,
        "long_sequence": False,
        "evicted_bytes": 0,
        "paged_in_bytes": 0,
        "gpu_page_faults": None,
        "thrashing_events": None,
        "optimizer_step_s": 0.01,
        "step_s": 0.1,
        "device_free_bytes": None,
        "alloc_retries": 0,
        "ooms": 0,
        "paged_bytes_total": 0,
        "source": "pressure",
        "estimated": True,
        "rank": 0,
        "run": "r",
    }


def test_summary_lists_the_slowest_steps_with_their_lengths():
    rows = [
        {**_row(step, seq_len=64 * (step + 1)), "step_s": s}
        for step, s in enumerate([0.1, 0.9, 0.2, 0.5, 0.3, 0.8])
    ]
    summary = summarize(rows, top_k=3)
    assert [(s.step, s.seq_len) for s in summary.slowest] == [(1, 128), (5, 384), (3, 256)]
    assert "slowest steps" in summary.render()
