#!/usr/bin/env bash
# The main job on the embedded default: bundled task -> baseline eval -> tree search (+ intervention,
# self-labels, reward relabeling) -> DPO arms next to controls -> eval -> report -> export folder.
# No GPU, no network. Output: runs/demo/ (report: runs/demo/report/report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
CONFIG=${1:-flows/configs/demo.yaml}
start=$(date +%s)
.venv/bin/prefpipe run "$CONFIG"
echo "main job finished in $(( $(date +%s) - start )) s; report: runs/demo/report/report.md"
