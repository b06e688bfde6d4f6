"""Several machines, as two "nodes" on loopback (one CPU process each): the processes that two launches start on
two node ranks join one world of 2 and train as one 2-process run on one machine does (same losses)."""

import subprocess
import sys

import pytest

from .conftest import (
    REPO,
    accelerate_launch,
    close,
    free_port,
    launch_env,
    logged,
    plain_sft_args,
    small_sft_data,
    world_size,
    zero_stage,
)

pytestmark = pytest.mark.distributed

STEPS = 2


def launch_nodes(node_command) -> None:
    """Starts ``node_command(node_rank)`` for node ranks 0 and 1 at once (as on two machines); both must succeed."""
    env = launch_env()
    nodes = [subprocess.Popen(node_command(rank), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}: {err[-4000:]}"


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    """(data, the root of a 2-process DDP run on one machine)."""
    root = tmp_path_factory.mktemp("multi_node")
    data = small_sft_data(root)
    accelerate_launch("cpu_ddp.yaml", "sft", plain_sft_args(data, root / "one", STEPS))
    assert world_size(root / "one", "sft") == 2
    return data, root / "one"


def assert_same_losses(run_root, reference) -> None:
    losses = logged(run_root, "sft", "train/loss")
    assert len(losses) == STEPS
    close(losses, logged(reference, "sft", "train/loss"))


def test_two_torchrun_nodes_train_as_one_world(one_machine, tmp_path):
    data, one = one_machine
    port = free_port()
    launch_nodes(lambda rank: [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
        str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "stages" / "sft.py"),
        *plain_sft_args(data, tmp_path, STEPS)])
    assert (world_size(tmp_path, "sft"), zero_stage(tmp_path, "sft")) == (2, 0)
    assert_same_losses(tmp_path, one)


def test_multi_node_config_on_two_loopback_nodes(one_machine, tmp_path):
    # The shipped config (ZeRO-2, 2 machines) with the sizes of this test: 1 CPU process per machine, fp32.
    data, one = one_machine
    port = free_port()
    launch_nodes(lambda rank: [
        sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
        str(REPO / "accelerate_configs" / "multi_node.yaml"), "--machine_rank", str(rank), "--num_machines", "2",
        "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no", str(REPO / "stages" / "sft.py"), *plain_sft_args(data, tmp_path, STEPS)])
    assert (world_size(tmp_path, "sft"), zero_stage(tmp_path, "sft")) == (2, 2)
    assert_same_losses(tmp_path, one)
