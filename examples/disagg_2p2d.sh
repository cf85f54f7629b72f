#!/usr/bin/env bash
# Two prefill and two decode instances behind `pp-engine proxy` on this host; one curl request;
# everything stopped on exit. See disagg_cluster.sh for the knobs (MODEL, SEND_TYPE, ports).
NUM_PREFILL=2 NUM_DECODE=2 exec bash "$(dirname "$0")/disagg_cluster.sh"
