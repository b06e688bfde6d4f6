import pytest
from transformers import AutoModel

from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.logging import read_jsonl
from rlhf_rrg.models.vision import RRGVisionModel
from rlhf_rrg.optim import OptimConfig, lr_factor
from rlhf_rrg.runroot import EXPORT_MARKER

from .conftest import accelerate_launch, logged, world_size

pytestmark = pytest.mark.distributed


def test_two_process_align_finishes_and_exports(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=0, image_size=64, seed=0))
    run_root = tmp_path / "run"
    accelerate_launch("cpu_ddp.yaml", "align", [
        "--config", "stages/configs/align/debug.yaml",
        "--run.run_root", str(run_root), "--run.init_from", "null",
        "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
        "--train.max_steps", "3", "--train.batch_size", "4", "--train.log_every", "1", "--eval.batch_size", "3",
        "--optim.lr", "4e-3", "--optim.warmup_steps", "1", "--checkpoint.save_every", "0",
    ])
    assert world_size(run_root, "align") == 2
    # One schedule step per optimizer step, as with one process (cosine to 0).
    cfg = OptimConfig(lr=4e-3, warmup_steps=1)
    assert logged(run_root, "align", "train/lr") == pytest.approx([4e-3 * lr_factor(s, 3, cfg) for s in (1, 2, 3)])
    export = run_root / "align" / "export"
    assert (export / EXPORT_MARKER).is_file()
    assert isinstance(AutoModel.from_pretrained(export / "vision"), RRGVisionModel)
    records = read_jsonl(run_root / "align" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    # 8 val studies over 2 processes in batches of 3 (uneven): gather_for_metrics must drop the padding.
    (final,) = [r for r in records if "eval/i2t_recall@1" in r]
    assert all(0.0 <= v <= 1.0 for k, v in final.items() if k.startswith("eval/"))
    recalls = {k: v for k, v in final.items() if "recall@" in k and not k.endswith("_chance")}
    assert recalls and all((v * 8).is_integer() for v in recalls.values()), recalls
