#!/usr/bin/env bash
# Step 5: RL from the SFT export against clinical rewards (the algorithm and rewards are in the stage config).
#   RRG_HOME=~/rrg ACCEL=zero2.yaml bash scripts/05_ppo.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
need_data
need_export sft 04_sft.sh
need_stage_config ppo
check_inputs
launch_stage ppo --run.init_from sft
