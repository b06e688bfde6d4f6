import json
import math

import numpy as np
import pytest
import torch

from rewards.observations import BLANK, CHEXPERT_14, NEGATIVE, POSITIVE
from rlhf_rrg.retrieval.memory_bank import MemoryBank, fixed_context

NO_FINDING = CHEXPERT_14.index("No Finding")
EFFUSION = CHEXPERT_14.index("Pleural Effusion")

# (id, angle in degrees, normal?, report). Unit vectors in 2-d, so cosine similarity = cos(angle difference).
ROWS = [
    ("s0", 0, False, "effusion"),
    ("s1", 10, False, "effusion"),
    ("s2", 12, False, "cardiomegaly"),
    ("s3", 15, False, "cardiomegaly"),
    ("s4", 30, False, "edema"),
    ("s5", 5, True, "normal"),
    ("s6", 20, True, "normal"),
    ("s7", 40, True, "clear lungs"),
    ("s8", 90, True, "no acute process"),
    ("s9", 0, False, "pneumothorax"),
]


def at(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def labels_for(normal_flags: list[bool]) -> torch.Tensor:
    labels = torch.full((len(normal_flags), 14), BLANK, dtype=torch.int8)
    for row, normal in enumerate(normal_flags):
        labels[row, NO_FINDING] = POSITIVE if normal else BLANK
        labels[row, EFFUSION] = NEGATIVE if normal else POSITIVE
    return labels


def make_bank(scale: float = 1.0) -> MemoryBank:
    ids, angles, normal, reports = zip(*ROWS, strict=True)
    emb = torch.stack([scale * at(a) for a in angles])
    return MemoryBank(emb, ids, reports, labels_for(list(normal)))


def test_query_ranks_by_cosine_and_skips_self_duplicates_and_repeated_reports():
    bank = make_bank(scale=3.0)  # stored embeddings are normalised
    pos, neg = bank.query(torch.stack([at(0), 2 * at(90)]), k_pos=3, k_neg=2, exclude_ids=[["s0"], []])
    # Query 0: s0 excluded by id, s9 is the same image (cos 1), s3 repeats s2's report, s6 repeats s5's.
    # Query 1: s8 is the same image; abnormal by similarity to 90 deg: s4, s3, (s2 repeats s3), s1.
    assert pos.tolist() == [[1, 2, 4], [4, 3, 1]]
    assert neg.tolist() == [[5, 7], [7, 6]]
    assert pos.dtype == neg.dtype == torch.long


def test_positives_are_abnormal_and_negatives_normal():
    bank = make_bank()
    pos, neg = bank.query(at(45)[None], k_pos=4, k_neg=3)
    assert not bank.is_normal[pos].any()
    assert bank.is_normal[neg].all()


def test_zero_k_and_too_few_studies():
    bank = make_bank()
    pos, neg = bank.query(at(0)[None].repeat(2, 1), k_pos=0, k_neg=1)
    assert pos.shape == (2, 0) and neg.shape == (2, 1)
    # Only three distinct normal reports exist, and the query image itself (s8) is skipped.
    with pytest.raises(ValueError, match="only 2 usable negative"):
        bank.query(at(90)[None], k_pos=1, k_neg=3)


def test_bad_query_shapes_are_named():
    bank = make_bank()
    with pytest.raises(ValueError, match=r"\(b, 2\)"):
        bank.query(torch.zeros(1, 3), 1, 1)
    with pytest.raises(ValueError, match="exclude_ids"):
        bank.query(torch.zeros(2, 2), 1, 1, exclude_ids=[["s0"]])


def test_constructor_validation():
    with pytest.raises(ValueError, match="unique"):
        MemoryBank(torch.eye(2), ["a", "a"], ["x", "y"], labels_for([True, False]))
    with pytest.raises(ValueError, match="labels"):
        MemoryBank(torch.eye(2), ["a", "b"], ["x", "y"], torch.zeros(2, 13))


@pytest.mark.parametrize("include_reports", [False, True])
def test_save_load_round_trip(tmp_path, include_reports):
    bank = make_bank()
    bank.save(tmp_path / "bank", include_reports=include_reports)
    loaded = MemoryBank.load(tmp_path / "bank")
    torch.testing.assert_close(loaded.embeddings, bank.embeddings)
    torch.testing.assert_close(loaded.labels, bank.labels)
    assert loaded.ids == bank.ids
    assert loaded.reports == (bank.reports if include_reports else None)
    stored = (tmp_path / "bank" / "memory_bank.json").read_text()
    assert ("cardiomegaly" in stored) == include_reports
    # Without the texts the bank still returns distinct reports: the query of the first test, same answer.
    query = torch.stack([at(0), 2 * at(90)])
    for a, b in zip(loaded.query(query, 3, 2, [["s0"], []]), bank.query(query, 3, 2, [["s0"], []]), strict=True):
        assert torch.equal(a, b)


def test_bank_without_reports_cannot_save_them(tmp_path):
    make_bank().save(tmp_path)
    with pytest.raises(ValueError, match="without its reports"):
        MemoryBank.load(tmp_path).save(tmp_path / "again", include_reports=True)


def test_loads_format_1_files(tmp_path):
    """Exports written before reports became opt-in (format 1: reports always stored, no report groups)."""
    bank = make_bank()
    bank.save(tmp_path, include_reports=True)
    meta = json.loads((tmp_path / "memory_bank.json").read_text())
    (tmp_path / "memory_bank.json").write_text(
        json.dumps({"format_version": 1, "ids": meta["ids"], "reports": meta["reports"]})
    )
    loaded = MemoryBank.load(tmp_path)
    assert loaded.reports == bank.reports
    query = torch.stack([at(0), 2 * at(90)])
    for a, b in zip(loaded.query(query, 3, 2, [["s0"], []]), bank.query(query, 3, 2, [["s0"], []]), strict=True):
        assert torch.equal(a, b)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory_bank.safetensors"):
        MemoryBank.load(tmp_path)
    make_bank().save(tmp_path)
    meta = json.loads((tmp_path / "memory_bank.json").read_text())
    meta["report_groups"] = meta["report_groups"][:-1]
    (tmp_path / "memory_bank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        MemoryBank.load(tmp_path)


def test_build_encodes_in_batches():
    torch.manual_seed(0)
    images = torch.randn(5, 1, 2, 3)
    weight = torch.randn(6, 4)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight

    batches = [
        {
            "pixel_values": images[:3],
            "id": ["a", "b", "c"],
            "report": ["r1", "r2", "r3"],
            "labels": labels_for([True, False, False]),
        },
        {"pixel_values": images[3:], "id": ["d", "e"], "report": ["r4", "r5"], "labels": labels_for([False, True])},
    ]
    bank = MemoryBank.build(encode, batches)
    torch.testing.assert_close(bank.embeddings, torch.nn.functional.normalize(encode(images), dim=-1))
    assert bank.ids == ["a", "b", "c", "d", "e"]
    assert bank.is_normal.tolist() == [True, False, False, False, True]
    with pytest.raises(KeyError, match="labels"):
        MemoryBank.build(encode, [{"pixel_values": images, "id": [], "report": []}])


def test_fixed_context_matches_r2gencsr_pandas_draw():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    normal = rng.random(80) < 0.4
    n = len(normal)
    bank = MemoryBank(
        torch.randn(n, 4), [f"id{i}" for i in range(n)], [f"r{i}" for i in range(n)], labels_for(normal.tolist())
    )
    pos, neg = fixed_context(bank, k_pos=3, k_neg=3, seed=42)

    # R2GenCSR: positive = df[no_finding != 1], negative = df[no_finding == 1],
    # each .sample(30, random_state=seed)[:3].
    df = pd.DataFrame({"row": range(n), "no_finding": normal.astype(int)})
    want_pos = df[df["no_finding"] != 1].sample(30, random_state=42)["row"].tolist()[:3]
    want_neg = df[df["no_finding"] == 1].sample(30, random_state=42)["row"].tolist()[:3]
    assert pos.tolist() == want_pos
    assert neg.tolist() == want_neg
    assert torch.equal(fixed_context(bank, 3, 3, seed=42)[0], pos)
    assert not torch.equal(fixed_context(bank, 3, 3, seed=4096)[0], pos)


def test_fixed_context_pool_too_small():
    with pytest.raises(ValueError, match="normal"):
        fixed_context(make_bank(), k_pos=1, k_neg=5, seed=0)
