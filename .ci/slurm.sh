#!/usr/bin/env bash
# CI: a real one-node Slurm cluster for the Slurm executor's tests (tests/slurm).
#
#   source .ci/slurm.sh        # before the tests: install, start, export the environment
#   bash .ci/slurm.sh stop     # after the tests (e.g. from an EXIT trap)
#
# Sourced, it starts the cluster (scripts/slurm/start-local-slurm.sh: installs Debian's
# slurmctld, slurmd, slurm-client and munge if missing; needs root) and exports SLURM_CONF
# and PIPELINE_REQUIRE_SLURM=1, so a cluster that is not there fails the Slurm tests instead
# of skipping them. If the cluster cannot be started, CI stops here with its error.
# The node advertises 8 CPUs (PIPELINE_SLURM_CPUS overrides) so the tests' one-second
# shell jobs run side by side on a 2-core machine.

_pipeline_slurm_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PIPELINE_SLURM_DIR=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}

if [ "${1:-}" = stop ]; then
    bash "$_pipeline_slurm_root/scripts/slurm/stop-local-slurm.sh" --purge
    exit $?
fi

echo "== slurm: starting a one-node cluster in $PIPELINE_SLURM_DIR"
if ! PIPELINE_SLURM_CPUS=${PIPELINE_SLURM_CPUS:-8} bash "$_pipeline_slurm_root/scripts/slurm/start-local-slurm.sh"; then
    echo "ci: ERROR: the Slurm cluster could not be started; the Slurm executor's tests cannot run" >&2
    # Sourced from .ci/run: this ends CI with a failure. Run directly: ends this script.
    exit 1
fi
# shellcheck disable=SC1091
source "$PIPELINE_SLURM_DIR/env.sh"
export PIPELINE_REQUIRE_SLURM=1
echo "== slurm: up (SLURM_CONF=$SLURM_CONF, PIPELINE_REQUIRE_SLURM=1)"
