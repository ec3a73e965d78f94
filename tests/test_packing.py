"""Packed micro-batches (rows, or one row for varlen attention; position_ids restarting per sequence) and the padded
fallback (one padded forward per term) give the loss, the per-token CE and KL and the gradients of the old single padded batch, on every model family;
the probe packs only models that keep packed sequences apart."""

import pytest
import torch

from dsunlearn.data.tokenization import TokenizedSequence, pad_batch
from dsunlearn.objective import NORMAL, PACKED, PADDED, VARLEN, build_step_batch, lay_out
from dsunlearn.runtime.distributed import UsageError
from dsunlearn.runtime.engines import UnlearningModel, disable_dropout
from dsunlearn.settings.config import ObjectiveConfig
from dsunlearn.train import forward_loss

VOCAB = 61
OBJECTIVE = ObjectiveConfig(forget_weight=0.5, random_weight=1.0, normal_weight=2.0, num_random_answers=2)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def gemma3_text():
    """Gemma 3's text model: a sliding window of 4 tokens, shorter than the forget sequences, and a logit softcap."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, sliding_window=4, layer_types=["sliding_attention"],
        final_logit_softcapping=2.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))


def cohere():
    """Logit scaling: the loss runs on the model's own logits (head_path=logits)."""
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2))


def gpt2():
    """Learned absolute positions, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


def opt():
    """The paper's model family: learned positions that take position_ids, but a causal mask built without them, so
    packed sequences would see each other."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2))


# family -> the layout the probe picks
FAMILIES = {llama: PACKED, qwen2: PACKED, gemma3_text: PACKED, cohere: PACKED, gpt2: PACKED, opt: PADDED}


def sequence(generator, prompt_length, response_length):
    ids = torch.randint(3, VOCAB, (prompt_length + response_length,), generator=generator).tolist()
    return TokenizedSequence(input_ids=ids, response_mask=[0] * prompt_length + [1] * response_length)


def step_sequences(seed=0):
    """Realistic proportions: long forget answers, short random and normal answers."""
    generator = torch.Generator().manual_seed(seed)
    forget = [sequence(generator, 3, 17), sequence(generator, 4, 11)]
    random = [sequence(generator, 3, 2), sequence(generator, 3, 1), sequence(generator, 4, 3), sequence(generator, 4, 2)]
    normal = [sequence(generator, 2, 4), sequence(generator, 5, 2)]
    return forget, random, normal


class InProcessEngine:
    """What forward_loss reads of a DeepSpeed engine: the wrapped module, and a call that runs it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def models(make_model, packing="auto", gradient_checkpointing=False):
    """The policy (dropout off, training mode) and a perturbed copy as the reference, both probed as the engines are."""
    torch.manual_seed(0)
    lm = make_model()
    torch.manual_seed(0)
    reference_lm = make_model()
    with torch.no_grad():
        for param in reference_lm.parameters():
            param.add_(0.05 * torch.randn_like(param))
    disable_dropout(lm)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    reference_lm.eval().requires_grad_(False)
    policy = UnlearningModel(lm, loss_backend="chunked", packing=packing)
    policy.choose_head_path()
    policy.choose_packing()
    reference = UnlearningModel(reference_lm, packing=packing)
    reference.choose_packing()
    return policy, reference


def old_single_padded_batch(lm, reference_lm, forget, random, normal):
    """The loss inputs as before packing: every sequence in one batch padded to the longest, the model's own logits at
    the positions that predict a response token, the reference's on the normal rows; float64 CE and KL from them."""
    sequences = forget + random + normal
    padded = pad_batch(sequences, pad_id=0)
    rows, columns = [], []
    for row, seq in enumerate(sequences):
        for position in range(len(seq) - 1):
            if seq.response_mask[position + 1]:
                rows.append(row)
                columns.append(position)
    rows, columns = torch.tensor(rows), torch.tensor(columns)
    targets = padded["input_ids"][rows, columns + 1]
    logits = lm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[rows, columns]
    first_normal = len(forget) + len(random)
    ref_padded = pad_batch(normal, pad_id=0)
    with torch.no_grad():
        ref_logits = reference_lm(input_ids=ref_padded["input_ids"], attention_mask=ref_padded["attention_mask"]).logits
    is_normal = rows >= first_normal
    ref_logits = ref_logits[rows[is_normal] - first_normal, columns[is_normal]]
    log_p = logits.double().log_softmax(-1)
    token_ce = -log_p.gather(1, targets[:, None])[:, 0]
    log_q = ref_logits.double().log_softmax(-1)
    token_kl = torch.zeros_like(token_ce)
    token_kl[is_normal] = (log_q.exp() * (log_q - log_p[is_normal])).sum(-1)
    return targets, rows, token_ce, token_kl


def gradients(lm):
    grads = {name: param.grad.clone() for name, param in lm.named_parameters() if param.grad is not None}
    lm.zero_grad(set_to_none=True)
    return grads


def relative_errors(actual: dict, expected: dict) -> dict:
    """Each gradient's error relative to its norm, or to a thousandth of the largest norm when it is smaller: a
    gradient that is 0 in exact arithmetic (a key projection's bias, whose shift every softmax cancels) is rounding."""
    floor = 1e-3 * max(float(grad.double().norm()) for grad in expected.values())
    return {name: float((actual[name].double() - grad.double()).norm()) / max(float(grad.double().norm()), floor)
            for name, grad in expected.items()}


def assert_step_equals_old_padded_batch(policy, reference, layout):
    forget, random, normal = step_sequences()
    batch = build_step_batch(forget, random, normal, 0, OBJECTIVE, layout=layout, ref_layout=layout)
    loss, token_ce, token_kl = forward_loss(InProcessEngine(policy), InProcessEngine(reference), batch)
    loss.backward()
    grads = gradients(policy.lm)

    targets, token_rows, old_ce, old_kl = old_single_padded_batch(policy.lm, reference.lm, forget, random, normal)
    assert batch.targets.tolist() == targets.tolist()  # the same tokens in the same order
    assert batch.token_sequence.tolist() == token_rows.tolist()
    old_loss = (batch.ce_weight.double() * old_ce).sum() + (batch.kl_weight.double() * old_kl).sum()
    old_loss.backward()
    old_grads = gradients(policy.lm)

    assert float(loss) == pytest.approx(float(old_loss), abs=2e-6)
    is_normal = batch.sequence_term[batch.token_sequence] == NORMAL
    assert token_ce[~is_normal].tolist() == pytest.approx(old_ce[~is_normal].tolist(), abs=2e-5)
    assert token_kl[is_normal].tolist() == pytest.approx(old_kl[is_normal].tolist(), abs=1e-6)
    assert float(old_kl[is_normal].abs().max()) > 1e-4  # a KL that says something: the reference differs
    assert set(grads) == set(old_grads)
    errors = relative_errors(grads, old_grads)
    assert max(errors.values()) < 1e-5, errors
    return batch


@pytest.mark.parametrize("make_model", list(FAMILIES), ids=[family.__name__ for family in FAMILIES])
def test_the_probe_packs_each_family_that_keeps_packed_sequences_apart(make_model, caplog):
    with caplog.at_level("WARNING", logger="dsunlearn.runtime.engines"):
        policy, reference = models(make_model)
    assert policy.packing == reference.packing == FAMILIES[make_model]
    if FAMILIES[make_model] == PADDED:
        assert "packed sequences do not get the hidden states they get one by one" in caplog.text
        assert "model.packing=padded" in caplog.text
        with pytest.raises(UsageError, match="model.packing=packed is not exact"):
            models(make_model, packing=PACKED)
    else:
        assert "model.packing" not in caplog.text


# Every family in the padded layout, and in the packed one where the probe packs it.
LAYOUTS = [(family, layout) for family in FAMILIES for layout in (PACKED, PADDED)
           if layout == PADDED or FAMILIES[family] == PACKED]


@pytest.mark.parametrize("make_model, layout", LAYOUTS, ids=[f"{family.__name__}-{layout}" for family, layout in LAYOUTS])
def test_each_layout_gives_the_loss_terms_and_gradients_of_one_padded_batch(make_model, layout):
    policy, reference = models(make_model, packing=layout)
    assert policy.packing == layout
    batch = assert_step_equals_old_padded_batch(policy, reference, layout)
    if make_model is cohere:
        assert policy.head_path == "logits"  # the logits path takes both layouts too
    # 3 padded forwards (one per term), or one packed forward whose rows are 1 to 2 longest sequences long.
    assert len(batch.segments) == (1 if layout == PACKED else 3)
    if layout == PACKED:
        forget, random, normal = step_sequences()
        (segment,) = batch.segments
        longest = max(len(s) for s in forget + random + normal)
        assert longest <= segment.input_ids.shape[1] <= 2 * longest
        assert batch.num_positions < 1.1 * batch.num_tokens


@pytest.mark.parametrize("make_model", [llama, gemma3_text, gpt2])
def test_one_varlen_row_gives_the_loss_terms_and_gradients_of_one_padded_batch(make_model):
    """The layout FlashAttention's varlen kernels get (one row, no padding at all) is exact under sdpa too."""
    policy, reference = models(make_model)
    policy.packing = reference.packing = VARLEN
    batch = assert_step_equals_old_padded_batch(policy, reference, VARLEN)
    assert batch.segments[0].input_ids.shape[0] == 1 and batch.num_positions == batch.num_tokens


def test_gradient_checkpointing_keeps_the_packed_step_exact():
    policy, reference = models(llama, packing=PACKED, gradient_checkpointing=True)
    assert policy.lm.is_gradient_checkpointing
    assert_step_equals_old_padded_batch(policy, reference, PACKED)


def test_packed_layout_by_hand():
    """Two sequences in one row: positions restart at 0, and the last token of the first sequence does not predict the
    first of the second."""

    def seq(prompt, response):
        return TokenizedSequence(input_ids=prompt + response, response_mask=[0] * len(prompt) + [1] * len(response))

    forget, random, normal = [seq([5, 6], [7, 8])], [seq([5], [9])], [seq([4, 4, 4], [3])]
    objective = ObjectiveConfig(num_random_answers=1)
    packed = build_step_batch(forget, random, normal, 0, objective, layout=VARLEN, ref_layout=VARLEN)
    (segment,) = packed.segments
    assert segment.input_ids.tolist() == [[5, 6, 7, 8, 5, 9, 4, 4, 4, 3]]
    assert segment.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3]]
    assert segment.attention_mask is None
    assert segment.token_index.tolist() == [1, 2, 4, 8]  # 3 (the 8) predicts nothing: 5 starts another sequence
    assert packed.targets.tolist() == [7, 8, 9, 3]
    assert packed.ref_segment.input_ids.tolist() == [[4, 4, 4, 3]] and packed.ref_segment.token_index.tolist() == [2]
    assert (packed.num_tokens, packed.num_positions) == (10, 10)

    # In rows as long as the longest sequence (4), longest first: the forget and the normal sequence fill a row each,
    # the random one shares nothing and gets a padded tail, a sequence of its own.
    rows = build_step_batch(forget, random, normal, 0, objective, layout=PACKED, ref_layout=PACKED)
    (segment,) = rows.segments
    assert segment.input_ids.tolist() == [[5, 6, 7, 8], [4, 4, 4, 3], [5, 9, 0, 0]]
    assert segment.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert segment.token_index.tolist() == [1, 2, 8, 6]  # in sequence order: forget, random, normal
    assert rows.targets.tolist() == packed.targets.tolist()
    assert (rows.num_tokens, rows.num_positions) == (10, 12)
    two_in_a_row = build_step_batch(forget, [seq([5], [9]), seq([6], [8])], [], 0, objective, layout=PACKED)
    assert two_in_a_row.segments[0].input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 6, 8]]
    assert two_in_a_row.segments[0].position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert two_in_a_row.segments[0].token_index.tolist() == [1, 2, 4, 6]

    padded = build_step_batch(forget, random, normal, 0, objective, layout=PADDED, ref_layout=PADDED)
    assert [s.input_ids.tolist() for s in padded.segments] == [[[5, 6, 7, 8]], [[5, 9]], [[4, 4, 4, 3]]]
    assert [s.token_index.tolist() for s in padded.segments] == [[1, 2], [0], [2]]
    assert padded.targets.tolist() == packed.targets.tolist()
    for name in ("ce_weight", "kl_weight", "token_sequence", "sequence_length"):
        assert getattr(padded, name).tolist() == getattr(packed, name).tolist(), name
    # Padded per term, the only padding is within a term: 2 forget + 4 random sequences of different lengths.
    two_terms = build_step_batch([seq([5], [7, 8, 9]), seq([5], [7])], [seq([5], [9])] * 2, [], 0, objective,
                                 layout=PADDED)
    assert (two_terms.num_tokens, two_terms.num_positions) == (6 + 4, 8 + 4)
    assert two_terms.ref_segment is None


@pytest.mark.distributed
@pytest.mark.integration
def test_the_trainer_on_two_ranks_logs_the_same_step_in_both_layouts_and_its_padded_share(
    tiny_model_dir, straight_run, tmp_path
):
    """The first step of the demo config through the trainer on 2 ranks, packed (the shared straight run: its first
    step does not depend on the run's length) and padded: the same metrics, and the share of padded positions each
    layout of this step's sequences gives."""
    import json

    from launching import launch
    from transformers import AutoTokenizer

    from dsunlearn.data.step_data import StepData
    from dsunlearn.settings.config import parse_run_config

    args = ["--config", "configs/demo.yaml", "--model.name_or_path", str(tiny_model_dir), "--output.dir",
            str(tmp_path / PADDED), "--train.max_steps", "1", "--model.packing", PADDED,
            "--output.evaluate", "false", "--output.export", "false"]
    code, output = launch(args)
    assert code == 0, output[-4000:]
    rows = {layout: json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
            for layout, run_dir in ((PACKED, straight_run), (PADDED, tmp_path / PADDED))}
    for key in ("forget_ce", "random_ce", "normal_kl", "normal_ce", "total", "grad_norm"):
        assert rows[PADDED][key] == pytest.approx(rows[PACKED][key], rel=1e-5, abs=1e-7), key

    cfg, _ = parse_run_config(args)
    step_data = StepData(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), world_size=2)
    tokens = positions = packed_positions = 0
    for rank in range(2):
        slot = step_data.slot(0, rank, 0)
        for group in (slot.forget, slot.random, slot.normal):
            tokens += sum(len(sequence) for sequence in group)
            positions += len(group) * max(len(sequence) for sequence in group)
        (segment,), _, _ = lay_out([slot.forget, slot.random, slot.normal], PACKED, pad_id=0)
        packed_positions += segment.input_ids.numel()
    assert rows[PACKED]["padded_share"] == pytest.approx(1 - tokens / packed_positions, rel=1e-6)
    assert rows[PACKED]["padded_share"] < rows[PADDED]["padded_share"] / 2
    assert rows[PADDED]["padded_share"] == pytest.approx(1 - tokens / positions, rel=1e-6)
    assert rows[PADDED]["padded_share"] > 0.05  # the demo's answers differ in length: the check says something


def test_the_probe_catches_an_attention_that_keeps_only_one_packed_row_apart(monkeypatch, caplog):
    """Real batches pack into several rows with padded tails. An attention path whose packed-sequence mask is right
    for the first row but is applied to every row (here: the sequence boundaries of row 0 broadcast to all rows) keeps
    one packed row exact and mixes the sequences of the others: the probe must pack in at least two rows, a padded
    tail among them, and send such a model to the padded layout."""
    import transformers.masking_utils as masking_utils

    from dsunlearn.runtime import engines

    right = masking_utils.find_packed_sequence_indices

    def first_row_only(position_ids):
        found = right(position_ids[:1])
        return None if found is None else found.expand(position_ids.shape[0], -1)

    probed = []

    def recording_pack(sequences, *args, **kwargs):
        packed = engines_pack(sequences, *args, **kwargs)
        probed.append((sum(len(sequence.input_ids) for sequence in sequences), packed[0]))
        return packed

    engines_pack = engines.pack_sequences
    monkeypatch.setattr(engines, "pack_sequences", recording_pack)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", first_row_only)
    with caplog.at_level("WARNING", logger="dsunlearn.runtime.engines"):
        policy, reference = models(llama)
    assert len(probed) == 2  # the policy's probe and the reference's
    for tokens, segment in probed:
        assert segment.input_ids.shape[0] >= 2  # several rows
        assert segment.input_ids.numel() > tokens  # a padded tail
    assert policy.packing == reference.packing == PADDED
    assert "packed sequences do not get the hidden states they get one by one" in caplog.text


def test_a_row_capacity_packs_into_rows_of_at_most_that_length():
    from dsunlearn.objective import pack_sequences

    sequences = [TokenizedSequence(input_ids=list(range(3, 3 + n)), response_mask=[1] * n) for n in (5, 4, 2, 2)]
    segment, targets, token_sequence = pack_sequences(sequences, pad_id=0, row_capacity=7)
    assert segment.input_ids.tolist() == [[3, 4, 5, 6, 7, 3, 4], [3, 4, 5, 6, 3, 4, 0]]
    assert segment.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 0]]
    assert token_sequence.tolist() == [0] * 4 + [1] * 3 + [2] + [3]
    with pytest.raises(ValueError, match="row_capacity"):
        pack_sequences(sequences, pad_id=0, row_capacity=4)
