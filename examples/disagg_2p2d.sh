#!/usr/bin/env bash
# Two prefill and two decode instances shared by two `pp-engine proxy` processes on this host;
# one curl request through each proxy; everything stopped on exit. See disagg_cluster.sh for the
# knobs (MODEL, SEND_TYPE, ports).
NUM_PREFILL=2 NUM_DECODE=2 NUM_PROXIES=${NUM_PROXIES:-2} exec bash "$(dirname "$0")/disagg_cluster.sh"
