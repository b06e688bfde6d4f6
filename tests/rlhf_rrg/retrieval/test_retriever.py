import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from rewards.observations import BLANK, CHEXPERT_14, POSITIVE
from rlhf_rrg.data.annotation import DataError
from rlhf_rrg.data.dataset import DataConfig, build_dataset
from rlhf_rrg.data.images import load_image
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.models.rrg import build_vision_model
from rlhf_rrg.retrieval.context import ContextConfig
from rlhf_rrg.retrieval.context_dataset import ContextDataset, collate_context
from rlhf_rrg.retrieval.memory_bank import MemoryBank, fixed_context
from rlhf_rrg.retrieval.retriever import ContextRetriever, dataset_neighbours, embed_studies

SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, SyntheticConfig(n_train=16, n_val=2, n_test=2, image_size=SIZE, seed=1))
    cfg = DataConfig(
        annotation_path=out / "annotation.json", image_root=out / "images", image_size=SIZE, mean=MEAN, std=STD
    )
    return build_dataset(cfg, "train", train=False)


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    return build_vision_model("tiny-vit").eval()


def image_paths(dataset) -> list[list[str]]:
    return [[str(p) for p in s.image_paths] for s in dataset.studies]


def separated_retriever(train_set, mode="retrieved", k_pos=2, k_neg=1, use_reports=False) -> ContextRetriever:
    """A bank over the synthetic studies' files with well-separated random embeddings (every 3rd study normal)."""
    n = len(train_set)
    labels = torch.full((n, len(CHEXPERT_14)), BLANK, dtype=torch.long)
    labels[::3, CHEXPERT_14.index("No Finding")] = POSITIVE
    embeddings = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    bank = MemoryBank(embeddings, [s.id for s in train_set.studies], [f"report {i}" for i in range(n)], labels)
    cfg = ContextConfig(mode=mode, k_pos=k_pos, k_neg=k_neg, seed=7, use_reports=use_reports)
    return ContextRetriever(cfg, bank, image_paths(train_set), SIZE, MEAN, STD)


def test_embed_studies_averages_pooled_views(vision):
    pixels = torch.randn(3, 2, 3, SIZE, SIZE)
    emb = embed_studies(vision, pixels)
    with torch.no_grad():
        per_view = [vision(pixels[:, v]).pooler_output for v in range(2)]
    assert emb.shape == (3, vision.config.hidden_size) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, (per_view[0] + per_view[1]) / 2)


def test_exclude_self_removes_the_query_study(train_set):
    retriever = separated_retriever(train_set)
    bank = retriever.bank
    # Perturbed queries: no longer near-duplicates, so only exclude_self keeps a study out of its own context.
    queries = bank.embeddings + 0.05 * torch.randn(bank.embeddings.shape, generator=torch.Generator().manual_seed(1))
    own_rows = torch.arange(len(bank))
    pos, neg = retriever.neighbours(queries, bank.ids, exclude_self=False)
    found_self = torch.where(bank.is_normal, neg[:, 0], pos[:, 0])
    assert torch.equal(found_self, own_rows)
    pos, neg = retriever.neighbours(queries, bank.ids, exclude_self=True)
    assert pos.shape == (len(bank), 2) and neg.shape == (len(bank), 1)
    assert not (torch.cat([pos, neg], 1) == own_rows[:, None]).any()
    assert (~bank.is_normal[pos]).all() and bank.is_normal[neg].all()


def test_fixed_mode_gives_every_query_the_same_draw(train_set):
    retriever = separated_retriever(train_set, mode="fixed")
    expected_pos, expected_neg = fixed_context(retriever.bank, 2, 1, seed=7)
    pos, neg = retriever.neighbours(torch.randn(5, 16), [f"q{i}" for i in range(5)], exclude_self=False)
    assert torch.equal(pos, expected_pos.expand(5, -1)) and torch.equal(neg, expected_neg.expand(5, -1))


def test_load_puts_negatives_first(train_set):
    retriever = separated_retriever(train_set)
    paths = image_paths(train_set)
    out = retriever.load([1, 2], [3])
    assert out["context_pixels"].shape == (3, 3, SIZE, SIZE)
    for slot, row in enumerate([3, 1, 2]):
        torch.testing.assert_close(out["context_pixels"][slot], load_image(paths[row][0], SIZE, MEAN, STD))
    assert out["neg_reports"] == ["report 3"] and out["pos_reports"] == ["report 1", "report 2"]


@pytest.mark.parametrize("use_reports", [False, True])
def test_save_load_round_trip(train_set, tmp_path, use_reports):
    retriever = separated_retriever(train_set, use_reports=use_reports)
    retriever.save(tmp_path)
    loaded = ContextRetriever.load_dir(tmp_path)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(retriever.cfg)
    assert loaded.bank.ids == retriever.bank.ids
    assert loaded.bank.reports == (retriever.bank.reports if use_reports else None)
    torch.testing.assert_close(loaded.bank.embeddings, retriever.bank.embeddings)
    assert torch.equal(loaded.bank.labels, retriever.bank.labels)
    assert json.loads((tmp_path / "bank_images.json").read_text())["bank_images"][3] == ["context_images/0000003.png"]
    assert (loaded.image_size, loaded.mean, loaded.std) == (SIZE, MEAN, STD)
    query = torch.randn(4, 16)
    for a, b in zip(
        loaded.neighbours(query, ["a", "b", "c", "d"], False),
        retriever.neighbours(query, ["a", "b", "c", "d"], False),
        strict=True,
    ):
        assert torch.equal(a, b)
    ours, theirs = loaded.load([0], [3]), retriever.load([0], [3])
    # 16-bit copies of the resized images: within 1/65535 of the pixels, divided by std 0.25.
    torch.testing.assert_close(ours["context_pixels"], theirs["context_pixels"], rtol=0, atol=4 / 65535)
    assert ours["pos_reports"] == (theirs["pos_reports"] if use_reports else [""])


def test_a_kept_encoder_is_a_frozen_copy_that_travels_with_the_export(train_set, vision, tmp_path):
    retriever = separated_retriever(train_set)
    assert retriever.encoder is None
    retriever.keep_encoder(vision)
    kept = retriever.encoder
    retriever.keep_encoder(build_vision_model("tiny-vit"))  # a later stage keeps the first encoder
    assert retriever.encoder is kept and kept is not vision
    assert not any(p.requires_grad for p in kept.parameters())
    pixels = torch.randn(2, 1, 3, SIZE, SIZE)
    before = embed_studies(vision, pixels)
    with torch.no_grad():  # the stage tunes its tower; the copy does not follow
        next(vision.parameters()).add_(1.0)
    try:
        torch.testing.assert_close(embed_studies(kept, pixels), before)
        assert not torch.allclose(embed_studies(vision, pixels), before)
    finally:
        with torch.no_grad():
            next(vision.parameters()).sub_(1.0)
    retriever.save(tmp_path)
    loaded = ContextRetriever.load_dir(tmp_path)
    torch.testing.assert_close(embed_studies(loaded.encoder, pixels), before)
    separated_retriever(train_set).save(tmp_path / "plain")
    assert ContextRetriever.load_dir(tmp_path / "plain").encoder is None


def test_saved_retriever_works_after_copy_with_the_data_gone(train_set, tmp_path):
    root = Path(os.path.commonpath([p for paths in image_paths(train_set) for p in paths]))
    data = tmp_path / "data"
    shutil.copytree(root, data)
    paths = [[str(data / Path(p).relative_to(root)) for p in s] for s in image_paths(train_set)]
    base = separated_retriever(train_set)
    retriever = ContextRetriever(base.cfg, base.bank, paths, SIZE, MEAN, STD)
    expected = retriever.load([1, 2], [3])["context_pixels"]
    retriever.save(tmp_path / "export")
    shutil.copytree(tmp_path / "export", tmp_path / "copied")
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "export")
    loaded = ContextRetriever.load_dir(tmp_path / "copied")
    torch.testing.assert_close(loaded.load([1, 2], [3])["context_pixels"], expected, rtol=0, atol=4 / 65535)
    with pytest.raises(DataError, match="0000004.png"):
        (tmp_path / "copied" / "context_images" / "0000004.png").unlink()
        loaded.load([4], [])


def test_reports_stay_out_unless_use_reports(train_set, tmp_path):
    separated_retriever(train_set).save(tmp_path)
    loaded = ContextRetriever.load_dir(tmp_path)
    assert "report 1" not in (tmp_path / "memory_bank.json").read_text()
    loaded.cfg.use_reports = True
    with pytest.raises(ValueError, match="without them"):
        loaded.load([1], [3])


def test_built_bank_and_dataset_neighbours(train_set, vision):
    cfg = ContextConfig(mode="retrieved", k_pos=2, k_neg=1)
    data = ContextDataset(train_set)
    batches = (
        {"pixel_values": b["pixel_values"], "id": b["ids"], "report": b["reports"], "labels": b["labels"]}
        for b in DataLoader(data, batch_size=5, collate_fn=collate_context)
    )
    retriever = ContextRetriever.build(cfg, vision, batches, image_paths(train_set), SIZE, MEAN, STD)
    assert retriever.bank.ids == [s.id for s in train_set.studies]
    assert retriever.num_context_images == 3
    pos, neg = dataset_neighbours(retriever, vision, data, collate_context, exclude_self=True, batch_size=3)
    # Same rows whatever the encoding batch size, and equal to querying all embeddings at once.
    everything = embed_studies(vision, torch.stack([data[i]["pixel_values"] for i in range(len(data))]))
    direct = retriever.neighbours(everything, retriever.bank.ids, exclude_self=True)
    assert torch.equal(pos, direct[0]) and torch.equal(neg, direct[1])
    assert not (torch.cat([pos, neg], 1) == torch.arange(len(data))[:, None]).any()


def test_constructor_errors(train_set):
    retriever = separated_retriever(train_set)
    with pytest.raises(ValueError, match="'retrieved' or 'fixed'"):
        ContextRetriever(ContextConfig(mode="none"), retriever.bank, retriever.bank_images, SIZE, MEAN, STD)
    with pytest.raises(ValueError, match="3 image lists for a memory bank of 16"):
        ContextRetriever(retriever.cfg, retriever.bank, retriever.bank_images[:3], SIZE, MEAN, STD)


def test_loads_exports_with_absolute_image_paths(train_set, tmp_path):
    """Exports written before the images were copied name the training files themselves."""
    retriever = separated_retriever(train_set)
    retriever.save(tmp_path)
    meta = json.loads((tmp_path / "bank_images.json").read_text())
    meta["bank_images"] = image_paths(train_set)
    (tmp_path / "bank_images.json").write_text(json.dumps(meta))
    loaded = ContextRetriever.load_dir(tmp_path)
    assert loaded.bank_images == image_paths(train_set)
    torch.testing.assert_close(loaded.load([0], [3])["context_pixels"], retriever.load([0], [3])["context_pixels"])
