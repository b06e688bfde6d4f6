"""RadGraph: F1 definitions on hand-built annotations, parity with the radgraph package's own model, batching."""

import tarfile

import pytest

from rewards.radgraph import RadGraphScorer, annotation_reward, preprocess_report
from rewards.weights import WeightsNotFoundError
from rlhf_rrg.testing.tiny_reward_weights import write_tiny_bert, write_tiny_radgraph

TEXTS = [
    "no acute cardiopulmonary process.",
    "Mild cardiomegaly with small left pleural effusion, unchanged.",
    "",
    "tube terminates 2 cm above the carina/. lungs are clear",
]


def _ann(*entities):
    """Annotation from (tokens, label, [(relation, target_id), ...]) triples, ids "1".."n"."""
    return {"entities": {str(i + 1): {"tokens": t, "label": lab, "relations": [list(r) for r in rels]}
                         for i, (t, lab, rels) in enumerate(entities)}}


HYP = _ann(("effusion", "OBS-DP", [("located_at", "2")]), ("pleural", "ANAT-DP", []),
           ("edema", "OBS-DA", []), ("Left", "ANAT-DP", []))
REF = _ann(("effusion", "OBS-DP", [("located_at", "2")]), ("pleural", "ANAT-DP", []),
           ("edema", "OBS-DP", []), ("heart", "ANAT-DP", [("modify", "3")]))


def test_reward_levels_hand_computed():
    # simple: hyp {eff, pleural, edema/DA, Left} vs ref {eff, pleural, edema/DP, heart}: 2 common of 4 and 4.
    assert annotation_reward(HYP, REF, "simple") == pytest.approx(0.5)
    # partial: (effusion, OBS-DP, True) and (pleural, ANAT-DP) common; heart has a relation in ref: 2/4, 2/4.
    assert annotation_reward(HYP, REF, "partial") == pytest.approx(0.5)
    # complete: hyp {(effusion,OBS-DP,located_at,pleural), pleural, edema/DA, Left};
    # ref {(effusion..pleural), pleural, edema/DP, (heart,ANAT-DP,modify,edema)}: 2/4 and 2/4.
    assert annotation_reward(HYP, REF, "complete") == pytest.approx(0.5)
    # radcliq: entity F1 0.5; relations hyp {eff->pleural} vs ref {eff->pleural, heart->edema}: P 1, R 1/2 -> 2/3.
    assert annotation_reward(HYP, REF, "radcliq") == pytest.approx((0.5 + 2 / 3) / 2)


def test_complete_level_lowercases_only_related_entities():
    hyp = _ann(("Effusion", "OBS-DP", [("located_at", "2")]), ("Pleural", "ANAT-DP", []))
    ref = _ann(("effusion", "OBS-DP", [("located_at", "2")]), ("pleural", "ANAT-DP", []))
    # The relation tuple matches after lower-casing; the relation-less "Pleural" entity does not.
    assert annotation_reward(hyp, ref, "complete") == pytest.approx(0.5)
    assert annotation_reward(hyp, ref, "simple") == 0.0


def test_empty_annotations_score_zero():
    empty = _ann()
    for level in ("simple", "partial", "complete", "radcliq"):
        assert annotation_reward(empty, REF, level) == 0.0
        assert annotation_reward(HYP, empty, level) == 0.0
    no_relations = _ann(("edema", "OBS-DA", []))
    # Entity F1 1, relation F1 0 (both relation sets empty) -> 0.5.
    assert annotation_reward(no_relations, no_relations, "radcliq") == 0.5
    with pytest.raises(ValueError, match="level"):
        annotation_reward(HYP, REF, "exact")


def test_preprocess_matches_radgraph_v1_split():
    assert preprocess_report("tube 2cm/above, carina.") == ["tube", "2cm", "/", "above", ",", "carina", "."]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("radgraph")
    bert = write_tiny_bert(root / "bert")
    return {"bert": bert, "archive": write_tiny_radgraph(root / "radgraph.tar.gz", bert),
            "folded": write_tiny_radgraph(root / "folded" / "radgraph.tar.gz", bert, max_length=8), "root": root}


@pytest.fixture(scope="module")
def scorer(weights):
    return RadGraphScorer(str(weights["archive"]), batch_size=3)


def _package_radgraph(archive, root, monkeypatch):
    """The radgraph package's own pipeline on the same archive, with the two tokenizer methods it needs."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "encode_plus", lambda self, *a, **k: self(*a, **k), raising=False)
    monkeypatch.setattr(PreTrainedTokenizerBase, "build_inputs_with_special_tokens",
                        lambda self, ids: [self.cls_token_id, *ids, self.sep_token_id], raising=False)
    from radgraph import RadGraph

    cache = root / f"cache_{archive.parent.name}"
    with tarfile.open(archive) as tar:
        tar.extractall(cache / "radgraph")
    return RadGraph(model_type="radgraph", model_cache_dir=str(cache), cuda=-1)


@pytest.mark.parametrize("key", ["archive", "folded"])
def test_annotations_equal_the_radgraph_package(weights, key, monkeypatch):
    package = _package_radgraph(weights[key], weights["root"], monkeypatch)
    expected = package(TEXTS)
    ours = RadGraphScorer(str(weights[key])).annotate(TEXTS)
    assert [expected[str(i)] for i in range(len(TEXTS))] == ours
    assert sum(len(a["entities"]) for a in ours) > 0
    assert any(e["relations"] for a in ours for e in a["entities"].values())


def test_batching_gives_the_same_annotations(scorer):
    one_by_one = [scorer.annotate([t])[0] for t in TEXTS]
    assert scorer.annotate(TEXTS) == one_by_one


def test_scores_and_reference_cache(scorer):
    hyps = [TEXTS[0], "", TEXTS[3]]
    refs = [TEXTS[0], TEXTS[1], TEXTS[1]]
    scorer._cache.clear()
    for level in ("simple", "partial", "complete"):
        scores = scorer.score(hyps, refs, level)
        assert scores[0] == 1.0 and scores[1] == 0.0
        assert scores[2] == annotation_reward(*scorer.annotate([TEXTS[3], TEXTS[1]]), level)
    # Only references of non-empty pairs are cached, once each.
    assert list(scorer._cache) == [TEXTS[0], TEXTS[1]]
    assert scorer.score(hyps, refs, "radcliq")[0] == 1.0
    with pytest.raises(ValueError, match="same length"):
        scorer.score(hyps, refs[:2])


def test_missing_archive_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("RRG_RADGRAPH_PATH", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        RadGraphScorer()
    message = str(info.value)
    assert "radgraph.tar.gz" in message and "$RRG_RADGRAPH_PATH" in message
    assert str(tmp_path / "xdg" / "radgraph" / "*" / "radgraph") in message


def test_non_gzip_archive_is_named(tmp_path):
    bad = tmp_path / "radgraph.tar.gz"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=rf"{bad}: not a readable RadGraph gzip tar archive"):
        RadGraphScorer(str(bad))
