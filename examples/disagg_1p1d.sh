#!/usr/bin/env bash
# One prefill and one decode instance behind `pp-engine proxy` on this host; one curl request;
# everything stopped on exit. See disagg_cluster.sh for the knobs (MODEL, SEND_TYPE, ports).
NUM_PREFILL=1 NUM_DECODE=1 exec bash "$(dirname "$0")/disagg_cluster.sh"
