import pytest
import torch

from rewards.observations import CHEXPERT_14, POSITIVE
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.memory_bank import MemoryBank
from rlhf_rrg.retrieval.retriever import ContextRetriever

SIZE = 64


def make_dataset(root, on_error="raise"):
    write_synthetic_dataset(root, SyntheticConfig(n_train=8, n_val=2, n_test=2, image_size=SIZE, seed=2))
    cfg = DataConfig(
        annotation_path=root / "annotation.json", image_root=root / "images", image_size=SIZE, on_error=on_error
    )
    return build_dataset(cfg, "train", train=False)


def make_retriever(base) -> ContextRetriever:
    n = len(base)
    labels = torch.zeros(n, len(CHEXPERT_14), dtype=torch.long)
    labels[n // 2 :, CHEXPERT_14.index("No Finding")] = POSITIVE
    bank = MemoryBank(torch.randn(n, 4), [s.id for s in base.studies], [f"report {i}" for i in range(n)], labels)
    paths = [[str(p) for p in s.image_paths] for s in base.studies]
    return ContextRetriever(ContextConfig(mode="retrieved", k_pos=1, k_neg=2), bank, paths, SIZE, base.mean, base.std)


def test_without_context_items_carry_empty_context(tmp_path):
    base = make_dataset(tmp_path)
    item = ContextDataset(base)[3]
    assert item["id"] == base.studies[3].id and item["report"] == base.report(3)
    assert item["context_pixels"].shape == (0, 3, SIZE, SIZE)
    assert item["neg_reports"] == [] and item["pos_reports"] == []


def test_items_carry_their_neighbours_context(tmp_path):
    base = make_dataset(tmp_path)
    retriever = make_retriever(base)
    pos = torch.arange(len(base))[:, None] % 4  # abnormal rows 0-3
    neg = torch.stack([4 + torch.arange(len(base)) % 4, 4 + (torch.arange(len(base)) + 1) % 4], 1)
    data = ContextDataset(base, retriever, (pos, neg))
    item = data[5]
    expected = retriever.load(pos[5].tolist(), neg[5].tolist())
    torch.testing.assert_close(item["context_pixels"], expected["context_pixels"])
    assert item["neg_reports"] == ["report 5", "report 6"] and item["pos_reports"] == ["report 1"]


def test_a_skipped_study_gets_the_context_of_the_study_returned(tmp_path):
    base = make_dataset(tmp_path, on_error="skip")
    base.studies[2].image_paths[0].write_bytes(b"not a png")
    retriever = make_retriever(base)
    pos = torch.arange(len(base))[:, None] % 4
    neg = torch.stack([4 + torch.arange(len(base)) % 4, 4 + (torch.arange(len(base)) + 1) % 4], 1)
    item = ContextDataset(base, retriever, (pos, neg))[2]
    assert item["index"] == 3 and item["id"] == base.studies[3].id
    assert item["pos_reports"] == ["report 3"] and item["neg_reports"] == ["report 7", "report 4"]


def test_retriever_and_neighbours_must_match_the_dataset(tmp_path):
    base = make_dataset(tmp_path)
    retriever = make_retriever(base)
    with pytest.raises(ValueError, match="go together"):
        ContextDataset(base, retriever)
    with pytest.raises(ValueError, match="cover 3 studies, the dataset has 8"):
        ContextDataset(base, retriever, (torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)))


def test_set_epoch_reaches_the_base_dataset(tmp_path):
    base = make_dataset(tmp_path)
    ContextDataset(base).set_epoch(4, seed=9)
    assert (base.epoch, base.seed) == (4, 9)


def test_collate_stacks_images_and_keeps_texts(tmp_path):
    data = ContextDataset(make_dataset(tmp_path))
    items = [data[0], data[1], data[2]]
    batch = collate_context(items)
    assert batch["ids"] == [i["id"] for i in items] and batch["reports"] == [i["report"] for i in items]
    assert batch["pixel_values"].shape == (3, 1, 3, SIZE, SIZE)
    assert batch["context_pixels"].shape == (3, 0, 3, SIZE, SIZE)
    assert batch["labels"].shape == (3, len(CHEXPERT_14))
    assert torch.equal(batch["labels"][1], items[1]["labels"])
    assert batch["neg_reports"] == [[], [], []]


def test_collate_labels_none_when_any_study_lacks_labels(tmp_path):
    data = ContextDataset(make_dataset(tmp_path))
    items = [data[0], {**data[1], "labels": None}]
    batch = collate_context(items)
    assert batch["labels"] is None
    assert batch["pixel_values"].shape[0] == 2
