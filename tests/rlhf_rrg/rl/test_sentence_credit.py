import pytest
import torch

from rewards.labeler import RuleLabeler
from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE
from rlhf_rrg.models.tokenizer import build_word_tokenizer
from rlhf_rrg.rl.ppo_step import ppo_targets
from rlhf_rrg.rl.sentence_credit import (
    LabelledSentences,
    SentenceCreditConfig,
    clue_codes,
    credit_matrix,
    label_sentences,
    sentence_credit_rewards,
    sentence_ends,
)

EDEMA, EFFUSION, NO_FINDING = (CHEXPERT_14.index(n) for n in ("Edema", "Pleural Effusion", "No Finding"))

CORPUS = ["there is mild pulmonary edema . the heart is enlarged . no pleural effusion . no pleural effusion .",
          "no pulmonary edema . there is a small right pleural effusion ; normal mediastinal contours"]


def _codes(**codes: int) -> torch.Tensor:
    row = torch.zeros(len(CHEXPERT_14), dtype=torch.long)
    for name, code in codes.items():
        row[CHEXPERT_14.index(name.replace("_", " "))] = code
    return row


def test_sentence_ends_close_on_punctuation_and_the_last_token():
    assert sentence_ends(["a", ".", "b", "c", ";", "d"]) == [1, 4, 5]
    assert sentence_ends(["no", "punctuation"]) == [1]
    assert sentence_ends(["x", "."]) == [1]


def test_credit_matrix_rewards_true_statements_and_penalises_the_rest():
    reference = _codes(Edema=POSITIVE, Cardiomegaly=POSITIVE, No_Finding=NEGATIVE)
    sentences = torch.stack([
        _codes(Edema=POSITIVE),                   # correct positive: +1
        _codes(Pleural_Effusion=POSITIVE),        # hallucination: -2
        _codes(Edema=NEGATIVE),                   # contradicts the reference: -2
        _codes(Pneumothorax=NEGATIVE),            # true negative: 0
        _codes(No_Finding=POSITIVE),              # left to the report-level reward: 0
    ])
    per_sentence, omission = credit_matrix(sentences, reference)
    torch.testing.assert_close(per_sentence, torch.tensor([1.0, -2.0, -2.0, 0.0, 0.0]))
    assert omission.item() == -1.0  # cardiomegaly is never stated


def test_pertinent_negatives_earn_credit_once_and_only_where_the_reference_denies_them():
    reference = _codes(Edema=POSITIVE, Pneumothorax=NEGATIVE, Pleural_Effusion=NEGATIVE)
    sentences = torch.stack([
        _codes(Pneumothorax=NEGATIVE),                          # pertinent negative: +0.5
        _codes(Pneumothorax=NEGATIVE, Pleural_Effusion=NEGATIVE),  # restated (0) and a second one (+0.5)
        _codes(Cardiomegaly=NEGATIVE),                          # the reference is silent on it: 0
        _codes(Edema=NEGATIVE),                                 # contradicts the reference: -2 as before
    ])
    per_sentence, omission = credit_matrix(sentences, reference, negative=0.5)
    torch.testing.assert_close(per_sentence, torch.tensor([0.5, 0.5, 0.0, -2.0]))
    assert omission.item() == -1.0
    off, _ = credit_matrix(sentences, reference)
    torch.testing.assert_close(off, torch.tensor([0.0, 0.0, 0.0, -2.0]))


def _expected_credit(p: float, sentences: list[torch.Tensor], negative: float = 0.0,
                     absent: torch.Tensor | None = None) -> float:
    """Expected total credit of a report over a finding present with probability ``p`` (edema); ``absent`` is the
    reference when it is not (default: silent on edema)."""
    totals = []
    for reference in (_codes(Edema=POSITIVE), _codes() if absent is None else absent):
        per_sentence, omission = credit_matrix(torch.stack(sentences), reference, negative=negative)
        totals.append((per_sentence.sum() + omission).item())
    return p * totals[0] + (1 - p) * totals[1]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.34, 0.45, 0.49, 0.51, 0.55, 0.7, 0.95])
def test_stating_pays_exactly_when_the_finding_is_more_likely_present(p):
    silent, state = [_codes(Pneumothorax=NEGATIVE)], [_codes(Edema=POSITIVE)]
    assert (_expected_credit(p, state) > _expected_credit(p, silent)) == (p > 0.5)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_stating_then_denying_never_beats_omission(p):
    silent = [_codes(Pneumothorax=NEGATIVE)]
    for hedge in ([_codes(Edema=POSITIVE), _codes(Edema=NEGATIVE)], [_codes(Edema=NEGATIVE), _codes(Edema=POSITIVE)],
                  [_codes(Edema=NEGATIVE)]):
        assert _expected_credit(p, hedge) <= _expected_credit(p, silent)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.3, 0.32, 0.35, 0.4, 0.6])
def test_with_a_denying_reference_a_pertinent_negative_pays_exactly_below_a_third(p):
    silent, deny = [_codes(Pneumothorax=NEGATIVE)], [_codes(Edema=NEGATIVE)]
    denies = _codes(Edema=NEGATIVE)
    gain = _expected_credit(p, deny, 1.0, denies) - _expected_credit(p, silent, 1.0, denies)
    assert (gain > 0) == (p < 1 / 3)  # (1 - p) earned against 2p: a contradiction costs 2 more than the omission


@pytest.mark.parametrize("negative", [0.5, 1.0])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_stating_then_denying_never_beats_omission_with_pertinent_negatives(p, negative):
    silent, denies = [_codes(Pneumothorax=NEGATIVE)], _codes(Edema=NEGATIVE)
    for hedge in ([_codes(Edema=POSITIVE), _codes(Edema=NEGATIVE)], [_codes(Edema=NEGATIVE), _codes(Edema=POSITIVE)]):
        assert _expected_credit(p, hedge, negative, denies) <= _expected_credit(p, silent, negative, denies)


def test_restating_a_finding_earns_nothing_and_repeating_a_sentence_costs():
    reference = _codes(Edema=POSITIVE)
    sentences = torch.stack([_codes(Edema=POSITIVE), _codes(Edema=POSITIVE), _codes(Pneumothorax=NEGATIVE),
                             _codes(Pneumothorax=NEGATIVE)])
    per_sentence, omission = credit_matrix(sentences, reference, torch.tensor([False, True, False, True]))
    torch.testing.assert_close(per_sentence, torch.tensor([1.0, -1.0, 0.0, -1.0]))
    assert omission.item() == 0.0


def test_credit_matrix_shape_errors():
    with pytest.raises(ValueError, match="sentence_labels"):
        credit_matrix(torch.zeros(2, 5, dtype=torch.long), _codes())
    with pytest.raises(ValueError, match="reference"):
        credit_matrix(torch.zeros(1, 14, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    one_sentence_each = LabelledSentences((2, 3), [3, 3], [[(0, 2)], [(0, 2)]],
                                          [torch.zeros(1, 14, dtype=torch.long)] * 2, [torch.tensor([False])] * 2)
    with pytest.raises(ValueError, match=r"reference_labels must be \(2, 14\)"):
        sentence_credit_rewards(one_sentence_each, torch.zeros(3, 14, dtype=torch.long))


def test_rewards_land_on_each_sentences_last_token(tmp_path):
    tokenizer = build_word_tokenizer(CORPUS, tmp_path)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in CORPUS]
    width = max(map(len, encoded)) + 2  # padding after the EOS must stay at zero
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    references = ["there is mild pulmonary edema . no pleural effusion .",
                  "there is mild pulmonary edema . the heart is enlarged ."]
    labelled, codes = label_sentences(ids, mask, tokenizer, RuleLabeler()), RuleLabeler().label(references)
    rewards = sentence_credit_rewards(labelled, codes)
    assert rewards.shape == ids.shape and (rewards[~mask.bool()] == 0).all()
    credited = [[(tokenizer.decode([ids[i, t]]), rewards[i, t].item()) for t in rewards[i].nonzero().flatten()]
                for i in range(2)]
    # 1: edema stated correctly (+1), the heart wrongly called enlarged (-2), "no pleural effusion" is right (0),
    # saying it again is a repeat (-1)
    assert credited[0] == [(".", 1.0), (".", -2.0), (".", -1.0)]
    # 2: edema denied (-2), a false effusion (-2); edema and cardiomegaly never stated: -2 on the last real token
    last = mask[1].sum() - 1
    assert credited[1][:2] == [(".", -2.0), (";", -2.0)]
    assert rewards[1, last].item() == -2.0
    # With pertinent negatives report 1's first "no pleural effusion" (its third sentence) matches its reference's
    # denial; the repeat earns nothing more, and report 2's reference denies nothing.
    with_negatives = sentence_credit_rewards(labelled, codes, negative=0.5)
    third_end = sentence_ends([tokenizer.decode([t]) for t in encoded[0]])[2]
    expected = rewards.clone()
    expected[0, third_end] += 0.5
    torch.testing.assert_close(with_negatives, expected)


def test_credit_against_clue_statements_rewards_writing_what_the_clue_sentence_states(tmp_path):
    tokenizer = build_word_tokenizer(CORPUS, tmp_path)
    row = tokenizer(CORPUS[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, mask = torch.tensor([row, row]), torch.ones(2, len(row), dtype=torch.long)
    # the first prompt's clue sentence states edema and effusion, the second's nothing
    clues = torch.zeros(2, len(CHEXPERT_14), dtype=torch.bool)
    clues[0, [EDEMA, EFFUSION]] = True
    codes = clue_codes(clues)
    assert codes[0, EDEMA] == codes[0, EFFUSION] == POSITIVE and (codes[1] == BLANK).all()
    assert (codes[0].ne(BLANK).sum()) == 2  # a clue sentence denies nothing
    rewards = sentence_credit_rewards(label_sentences(ids, mask, tokenizer, RuleLabeler()), codes, negative=1.0)
    ends = sentence_ends([tokenizer.decode([t]) for t in row])
    # 1: edema as stated (+1), an enlarged heart the clue does not state (-2), effusion denied against the clue
    # (-2), then denied again (-2, and -1 for the repeat); effusion never stated: -1 on the EOS; no pertinent
    # negative, since the clue denies nothing
    assert [rewards[0, e].item() for e in ends] == [1.0, -2.0, -2.0, -3.0, -1.0]
    # 2: edema and the heart stated where the clue states nothing (-2 each), the repeat (-1), no omission
    assert [rewards[1, e].item() for e in ends] == [-2.0, -2.0, 0.0, -1.0, 0.0]


def test_ppo_targets_add_dense_rewards_before_gae():
    scores, mask = torch.zeros(1), torch.ones(1, 3)
    zeros = torch.zeros(1, 3)
    dense = torch.tensor([[0.0, 1.0, 0.0]])
    plain = ppo_targets(scores, zeros, zeros, zeros, mask, 0.0, "k1", 1.0, 1.0, False)
    with_credit = ppo_targets(scores, zeros, zeros, zeros, mask, 0.0, "k1", 1.0, 1.0, False, dense)
    torch.testing.assert_close(plain.returns, zeros)
    # gamma = lam = 1 and zero values: the return of each token is the credit still ahead of it
    torch.testing.assert_close(with_credit.returns, torch.tensor([[1.0, 1.0, 0.0]]))


def test_config_validates():
    with pytest.raises(ValueError, match="weight"):
        SentenceCreditConfig(weight=-1.0)
    with pytest.raises(ValueError, match="labeler"):
        SentenceCreditConfig(labeler="gpt")
    for negative in (-0.1, 1.5):
        with pytest.raises(ValueError, match="negative"):
            SentenceCreditConfig(negative=negative)
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="clue_share must be in"):
            SentenceCreditConfig(weight=1.0, clue_share=share)
    with pytest.raises(ValueError, match="clue_share needs the credit on"):
        SentenceCreditConfig(clue_share=0.5)
