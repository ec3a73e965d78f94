"""The objective's per-token weights and term logging, against hand-derived values."""

import pytest
import torch

from dsunlearn.data.tokenization import TokenizedSequence
from dsunlearn.objective import (
    FORGET,
    NORMAL,
    RANDOM,
    build_step_batch,
    response_positions,
    term_means,
    term_sums,
    term_token_counts,
)
from dsunlearn.settings.config import ObjectiveConfig


def seq(prompt, response):
    return TokenizedSequence(input_ids=list(prompt) + list(response), response_mask=[0] * len(prompt) + [1] * len(response))


def test_response_positions_are_the_positions_before_each_response_token():
    # Sequence 0: prompt [5, 6], response [7, 8]; sequence 1: prompt [5], response [9], then padding.
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    flat, targets, sequence = response_positions(response_mask, input_ids)
    # position 1 predicts 7, position 2 predicts 8 (row 0); position 0 of row 1 (flat 4) predicts 9.
    assert flat.tolist() == [1, 2, 4]
    assert targets.tolist() == [7, 8, 9]
    assert sequence.tolist() == [0, 0, 1]


def test_sequence_mean_weights_by_hand():
    objective = ObjectiveConfig(forget_weight=0.5, random_weight=1.0, normal_weight=2.0, num_random_answers=2)
    forget = [seq([1, 2], [3, 4]), seq([1], [5])]  # 2 and 1 response tokens, B_f = 2
    random = [seq([1, 2], [6]), seq([1, 2], [7, 8, 9]), seq([1], [6]), seq([1], [7])]  # B_f*K = 4
    normal = [seq([1, 1, 1], [4, 4])]  # B_n = 1
    batch = build_step_batch(forget, random, normal, pad_id=0, objective=objective)

    expected_ce = (
        [-0.5 / (2 * 2)] * 2 + [-0.5 / (1 * 2)]  # forget: -e1 / (n_s * B_f)
        + [1.0 / (1 * 4)] + [1.0 / (3 * 4)] * 3 + [1.0 / 4] * 2  # random: e2 / (n_s * B_f * K)
        + [0.0, 0.0]
    )
    expected_kl = [0.0] * 9 + [2.0 / (2 * 1)] * 2  # normal: e3 / (n_s * B_n)
    assert batch.ce_weight.tolist() == pytest.approx(expected_ce)
    assert batch.kl_weight.tolist() == pytest.approx(expected_kl)
    assert batch.targets.tolist() == [3, 4, 5, 6, 7, 8, 9, 6, 7, 4, 4]
    assert batch.sequence_term.tolist() == [FORGET] * 2 + [RANDOM] * 4 + [NORMAL]
    # The reference sees only the normal row; its two response tokens are the last two of the batch.
    assert batch.ref_segment.input_ids.tolist() == [[1, 1, 1, 4, 4]]
    assert batch.ref_segment.token_index.tolist() == [2, 3]
    assert batch.num_tokens == 4 + 2 + 3 + 5 + 2 + 2 + 5
    # Packed in rows of 5 to 10 tokens (1 to 2 longest sequences), longest first, the capacity that leaves the fewest
    # positions: 8, with rows [5 3] [5 2] [4 2 2]; 5 gives [5] [5] [4] [3 2] [2 2], 25 positions.
    assert batch.num_positions == 3 * 8


def test_token_mean_divides_by_the_tokens_of_the_whole_step():
    objective = ObjectiveConfig(forget_weight=1.0, random_weight=1.0, normal_weight=1.0, reduction="token_mean")
    # One step of 2 ranks x 2 micro-steps: 4 micro-batches of different lengths.
    slots = [
        ([seq([1], [3, 4])], [seq([1], [6])], [seq([1], [4, 4, 4])]),
        ([seq([1], [3])], [seq([1], [6, 6])], [seq([1], [4])]),
        ([seq([1], [3, 4, 5])], [seq([1], [6])], [seq([1], [4, 4])]),
        ([seq([1], [3])], [seq([1], [6, 6, 6])], [seq([1], [4, 4])]),
    ]
    step_tokens = sum(term_token_counts(*slot) for slot in slots)
    assert step_tokens.tolist() == [7, 7, 8]
    batches = [build_step_batch(*slot, 0, objective, step_tokens, micro_batches_per_step=4) for slot in slots]
    # DeepSpeed averages the 4 micro-batches' gradients: each token's weight / 4 is then e / (the term's step tokens).
    assert batches[0].ce_weight.tolist() == pytest.approx([-4 / 7, -4 / 7, 4 / 7, 0, 0, 0])
    assert batches[0].kl_weight.tolist() == pytest.approx([0, 0, 0, 4 / 8, 4 / 8, 4 / 8])
    effective = [0.0, 0.0, 0.0]
    for batch in batches:
        term = batch.sequence_term[batch.token_sequence]
        for t in (FORGET, RANDOM):
            effective[t] += float(batch.ce_weight[term == t].sum()) / 4
        effective[NORMAL] += float(batch.kl_weight[term == NORMAL].sum()) / 4
    assert effective == pytest.approx([-1.0, 1.0, 1.0])


def test_term_sums_are_sequence_means():
    objective = ObjectiveConfig(num_random_answers=1)
    batch = build_step_batch([seq([1], [2, 3]), seq([1], [4])], [seq([1], [5])], [seq([1], [6, 7])], 0, objective)
    token_ce = torch.tensor([1.0, 3.0, 5.0, 7.0, 0.5, 1.5])
    token_kl = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.4])
    means = term_means(term_sums(batch, token_ce, token_kl))
    assert means["forget_ce"] == pytest.approx(((1 + 3) / 2 + 5) / 2)
    assert means["random_ce"] == pytest.approx(7.0)
    assert means["normal_kl"] == pytest.approx(0.3)
    assert means["normal_ce"] == pytest.approx(1.0)


def test_empty_term_logs_none_and_truncated_response_is_an_error():
    objective = ObjectiveConfig(random_weight=0.0, normal_weight=0.0)
    batch = build_step_batch([seq([1], [2])], [], [], 0, objective)
    assert batch.kl_weight is None and batch.ref_segment is None
    means = term_means(term_sums(batch, torch.tensor([2.0]), torch.zeros(1)))
    assert means["forget_ce"] == 2.0 and means["normal_kl"] is None
    with pytest.raises(ValueError, match="no response token"):
        build_step_batch([seq([1, 2], [])], [], [], 0, objective)
