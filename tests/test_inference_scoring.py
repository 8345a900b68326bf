"""jaxlm.inference.scoring: packing documents into scored rows, and multiple-choice accuracy
summed and per byte."""

import numpy as np

from jaxlm.inference.scoring import choice_accuracy, pack_rows


def test_pack_rows_scores_every_target_once_and_cuts_only_long_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 50, n).astype(np.int32) for n in (5, 9, 3, 23, 7)]
    rows = pack_rows(docs, seq_len=8)
    pairs = [
        (int(r["inputs"][j]), int(r["targets"][j]), int(r["positions"][j]))
        for r in rows
        for j in np.flatnonzero(r["weights"])
    ]
    want = []
    for d in docs:  # the 23-token document is cut into windows of 8, 8 and 6 targets
        want += [(int(d[t]), int(d[t + 1]), t % 8) for t in range(len(d) - 1)]
    assert sorted(pairs) == sorted(want)
    # The 9-token doc (8 targets) fills a row of its own instead of being split over two.
    assert any(r["segment_ids"].tolist() == [1] * 8 for r in rows)


def test_summed_and_per_byte_accuracy_can_disagree():
    items = [{"context": "", "choices": ["a", "bbbbbbbb"], "answer": 1}]
    # The long choice loses on the sum (-4 < -1) but wins per byte (-0.5 > -1).
    assert choice_accuracy(items, [[-1.0, -4.0]]) == {"items": 1, "acc": 0.0, "acc_norm": 1.0}
