"""Disaggregated prefill/decode: a prompt is computed on a prefill instance, its KV cache moves
to a decode instance, which generates the answer (issues 10 and 12; DESIGN.md section 7). Any
number of prefill and decode instances join and leave live behind one or several proxies.

One concept per module: `config` (the `--kv-transfer-config` JSON), `transfer_params` (what P
hands D through the proxy), `leases` (P's blocks held for D until released or expired),
`kv_wire` (the KV control messages: pull, push offer and reply, release), `receive_buffer`
(D's pushed KV until its request takes it), `connector` (the engine side of KV transfer),
`discovery` (the registry of instances: heartbeats, load routing), `instance` (a server's side:
registration with each proxy, return addresses), `wire` (proxy <-> instance messages), `proxy`
(`pp-engine proxy`: the OpenAI front door), `instance_pool` (its sockets to the instances),
`proxy_metrics`.
"""
