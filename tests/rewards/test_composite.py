import json
import logging
import sys

import pytest

import rewards
from rewards import REGISTRY, CompositeReward, build_reward, build_reward_from_config, clinical_offline, default_reward
from rewards.clinical import CheXpertF1Reward
from rewards.nlg import Bleu2RadCliQ, BleuReward, RougeLReward
from rewards.radcliq import RadCliQReward

HYPS = ["Mild cardiomegaly. No effusion.", "Lungs are clear.", ""]
REFS = ["Mild cardiomegaly. Small right effusion.", "Lungs are clear. No pneumothorax.", "No acute process."]


def test_registry_names_build_the_right_classes_without_weights():
    expected = {
        "bleu": BleuReward,
        "bleu2_radcliq": Bleu2RadCliQ,
        "rouge_l": RougeLReward,
        "radcliq_v1": RadCliQReward,
        "chexpert_f1": CheXpertF1Reward,
        "chexbert_f1": CheXpertF1Reward,
        "clinical_offline": CompositeReward,
    }
    for name, cls in expected.items():
        reward = build_reward(name)
        assert isinstance(reward, cls), name
        assert isinstance(reward, rewards.Reward), name
    assert {"bertscore", "chexbert_similarity", "radgraph", "radcliq_v0", "cider_d"} <= set(REGISTRY)
    assert build_reward("bleu", n=2).name == "bleu2"
    assert build_reward("radgraph", level="complete").name == "radgraph_complete"
    assert build_reward("chexbert_f1").name == "chexbert_f1"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*radcliq_v1"):
        build_reward("radcliq")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        build_reward("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_reward("rewards.nlg:Nope")
    with pytest.raises(ValueError, match="'name'"):
        build_reward({"weight": 2.0})


def test_cider_d_needs_a_corpus(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        build_reward("cider_d")
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"train": [{"id": "1", "report": r} for r in REFS], "test": []}))
    from_file = build_reward("cider_d", corpus_path=str(annotation))
    from_list = build_reward("cider_d", corpus=REFS)
    assert from_file.score(HYPS, REFS).scores == from_list.score(HYPS, REFS).scores
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps({"report": r}) for r in REFS))
    assert (
        build_reward("cider_d", corpus_path=str(jsonl)).score(HYPS, REFS).scores == from_list.score(HYPS, REFS).scores
    )


def test_dotted_paths_to_classes_and_functions(tmp_path, monkeypatch):
    assert build_reward("rewards.nlg:BleuReward", n=3).name == "bleu3"
    assert build_reward("rewards.nlg.RougeLReward").name == "rouge_l"
    (tmp_path / "my_rewards.py").write_text(
        "def length_ratio(completions, reference, **kwargs):\n"
        "    return [len(c) / len(r) for c, r in zip(completions, reference)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("my_rewards:length_ratio")
    assert reward.name == reward.__name__ == "length_ratio"
    assert reward.score(["ab"], ["abcd"]).scores == [0.5]
    assert reward(prompts=["p"], completions=[[{"role": "assistant", "content": "ab"}]], reference=["abcd"]) == [0.5]
    sys.modules.pop("my_rewards", None)


def test_composite_is_the_weighted_sum_with_member_logs():
    bleu, rouge = Bleu2RadCliQ(), RougeLReward()
    composite = CompositeReward([bleu, rouge], [0.3, 2.0])
    out = composite.score(HYPS, REFS)
    b, r = bleu.score(HYPS, REFS).scores, rouge.score(HYPS, REFS).scores
    assert out.scores == pytest.approx([0.3 * x + 2.0 * y for x, y in zip(b, r, strict=True)])
    assert out.sub_scores["bleu2_radcliq"] == b and out.sub_scores["rouge_l"] == r
    assert composite.worst == 0.0
    assert set(out.log("reward/composite")) == {
        "reward/composite",
        "reward/composite/bleu2_radcliq",
        "reward/composite/rouge_l",
    }
    twice = CompositeReward([BleuReward(2), BleuReward(2)])
    assert twice.member_names == ["bleu2_0", "bleu2_1"]
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        CompositeReward([bleu], [1.0, 2.0])


def test_build_reward_from_config_weights():
    single = build_reward_from_config(["rouge_l"])
    assert isinstance(single, RougeLReward)
    combo = build_reward_from_config(["bleu2_radcliq", "rouge_l"], [0.5, 0.5])
    assert combo.name == "bleu2_radcliq+rouge_l" and combo.weights == [0.5, 0.5]
    mapped = build_reward_from_config([{"name": "bleu", "weight": 2.0, "kwargs": {"n": 1}}, "rouge_l"])
    assert mapped.weights == [2.0, 1.0] and mapped.rewards[0].name == "bleu1"
    scaled = build_reward({"name": "rouge_l", "weight": 3.0})
    assert scaled.score(HYPS[:1], REFS[:1]).scores == pytest.approx(
        [3 * RougeLReward().score(HYPS[:1], REFS[:1]).scores[0]]
    )
    with pytest.raises(ValueError, match="reward_weights has 1 entries but reward_funcs has 2"):
        build_reward_from_config(["bleu", "rouge_l"], [1.0])
    with pytest.raises(ValueError, match="not both"):
        build_reward_from_config([{"name": "bleu", "weight": 2.0}], [1.0])


def test_clinical_offline_composition():
    reward = clinical_offline()
    out = reward.score(HYPS, REFS)
    f1 = CheXpertF1Reward().score(HYPS, REFS).scores
    b = Bleu2RadCliQ().score(HYPS, REFS).scores
    r = RougeLReward().score(HYPS, REFS).scores
    assert out.scores == pytest.approx([0.5 * x + 0.25 * y + 0.25 * z for x, y, z in zip(f1, b, r, strict=True)])
    assert out.scores[2] == 0.0  # empty report: worst of every member


def test_default_reward_falls_back_when_weights_are_missing(monkeypatch, tmp_path, caplog):
    for var in ("RRG_CHEXBERT_PATH", "RRG_RADGRAPH_PATH", "RRG_BERTSCORE_MODEL"):
        monkeypatch.setenv(var, str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="rewards.composite"):
        reward = default_reward()
    assert reward.name == "clinical_offline"
    assert "radcliq_v1" in caplog.text and "missing" in caplog.text
