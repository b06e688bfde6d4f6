"""``accelerate launch stages/ppo.py``: one process and 2-process DDP on CPU (PPO and SCST); each run reports the world
size it ran with and follows the same lr schedule. RL under DeepSpeed ZeRO is ``test_zero.py``'s, against these DDP
runs' schedule."""


import pytest

from rlhf_rrg.config import load_config
from rlhf_rrg.data.synthetic import SyntheticConfig, write_synthetic_dataset
from rlhf_rrg.optim import OptimConfig, lr_factor
from rlhf_rrg.testing.stage_scripts import load_stage

from .conftest import REPO, accelerate_launch, logged, world_size, zero_stage

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_and_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_launch")
    data = root / "data"
    write_synthetic_dataset(data, SyntheticConfig(n_train=32, n_val=8, n_test=8, image_size=64, seed=0))
    sft = load_stage("sft")
    cfg = load_config(sft.SFTStageConfig, REPO / "stages" / "configs" / "sft" / "debug.yaml", [
        "--run.run_root", str(root), "--run.init_from", "null",
        "--data.annotation_path", str(data / "annotation.json"),
        "--data.image_root", str(data / "images"), "--model.vision", "tiny-vit", "--prompting.context.mode", "none",
        "--prompting.clues.enabled", "false", "--self_refine.weight", "0", "--train.max_steps", "10",
        "--train.batch_size", "8", "--train.eval_every", "0", "--checkpoint.save_every", "0",
        "--eval.max_samples", "2", "--eval.max_new_tokens", "4"])
    sft.main(cfg)
    return data, root / "sft" / "export"


@pytest.mark.parametrize(("config", "algo", "processes"), [
    ("cpu_debug.yaml", "ppo", 1),
    ("cpu_ddp.yaml", "ppo", 2),
    ("cpu_ddp.yaml", "scst", 2),
], ids=["single", "ddp2", "ddp2-scst"])
def test_accelerate_launch_runs_ppo(data_and_export, tmp_path, config, algo, processes):
    data, export = data_and_export
    result = accelerate_launch(config, "ppo", [
        "--config", f"stages/configs/ppo/{'debug_scst' if algo == 'scst' else 'debug'}.yaml",
        "--run.run_root", str(tmp_path), "--run.init_from", str(export),
        "--data.annotation_path", str(data / "annotation.json"), "--data.image_root", str(data / "images"),
        "--train.max_steps", "2", "--train.batch_size", "4", "--generation.max_new_tokens", "8",
        "--optim.lr", "2e-4", "--optim.schedule", "linear", "--optim.warmup_steps", "1",
        "--eval.max_samples", "2", "--eval.max_new_tokens", "4",
        # PPO trains the LLM (it cannot sample clue statements; the export has no clue head either).
        *(["--algo", "ppo", "--pg.train_clues", "false", "--generation.num_samples", "1", "--ppo.minibatch_size",
           "2", "--ppo.ppo_epochs", "1"] if algo == "ppo" else ["--generation.num_samples", "2"]),
    ])
    assert f"{algo}: reward" in result.stdout
    assert world_size(tmp_path, "ppo") == processes
    assert zero_stage(tmp_path, "ppo") == 0
    assert len(logged(tmp_path, "ppo", "reward/mean")) == 2
    # The schedule counts optimizer updates per process (PPO: 4 // 2 minibatches per step; SCST: one), so
    # every process count walks it at the same pace.
    updates = 2 if algo == "ppo" else 1
    cfg = OptimConfig(lr=2e-4, warmup_steps=1, schedule="linear")
    expected = [2e-4 * lr_factor(step * updates, 2 * updates, cfg) for step in (1, 2)]
    assert logged(tmp_path, "ppo", "train/lr") == pytest.approx(expected)
    assert (tmp_path / "ppo" / "export" / "export_complete.json").is_file()
    assert (tmp_path / "ppo" / "checkpoints" / "step_000002").is_dir()
