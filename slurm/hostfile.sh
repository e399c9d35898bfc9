#!/bin/bash
# Print a DeepSpeed hostfile ("HOST slots=N", one line per node) for the current Slurm job.
#
#   slurm/hostfile.sh [SLOTS] > hostfile
#
# SLOTS: processes (GPUs) per node; default SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE, else 1.
# Nodes come from SLURM_JOB_NODELIST (or the NODELIST variable, e.g. "gpu[01-04]"), expanded with
# `scontrol show hostnames`. Use it with the deepspeed launcher, e.g. inside an allocation:
#   slurm/hostfile.sh 8 > hostfile
#   deepspeed --hostfile hostfile --master_addr "$(head -n1 hostfile | cut -d' ' -f1)" \
#       --master_port 29611 --module mdt_ds.train --config my_run.yaml
set -euo pipefail
SLOTS=${1:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
SLOTS=${SLOTS%%(*}  # SLURM_NTASKS_PER_NODE may read "8(x4)"
LIST=${NODELIST:-${SLURM_JOB_NODELIST:-}}
if [ -z "$LIST" ]; then
    echo "hostfile.sh: no SLURM_JOB_NODELIST (run inside a Slurm job, or set NODELIST)" >&2
    exit 1
fi
case $SLOTS in ''|*[!0-9]*) echo "hostfile.sh: SLOTS must be a number, got '$SLOTS'" >&2; exit 1 ;; esac
scontrol show hostnames "$LIST" | while read -r host; do
    [ -n "$host" ] && echo "$host slots=$SLOTS"
done
