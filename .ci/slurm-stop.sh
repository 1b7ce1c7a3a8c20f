#!/usr/bin/env bash
# Stops the daemons .ci/slurm-setup.sh started.
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
pkill -x munged 2>/dev/null || true
exit 0
