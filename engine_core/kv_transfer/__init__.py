"""The engine side of disaggregated prefill/decode (DESIGN.md section 7): a prompt computed on a
prefill instance moves its KV cache to a decode instance.

One concept per module: `connector` (`KVConnector`, the implementation of
`engine_core.kv_connector.KVConnectorBase` that the loop drives), `local_kv` (this instance's
blocks, layout and leases), `leases` (P's blocks held for D until released or expired),
`kv_server` (the KV endpoint), `kv_fetcher` (D pulls), `kv_pusher` (P pushes), `receive_buffer`
(D's pushed KV until its request takes it), `kv_wire` (the KV control messages),
`peer_sockets`, `transfer_stats`. The HTTP side (an instance's registration with proxies, the
proxy) lives in `engine_core/entrypoints/`.
"""
