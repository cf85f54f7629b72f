"""xPyD faults end to end (`pp-engine proxy` + `pp-engine serve --kv-transfer-config`
processes, the official `openai` client): instances join and die while clients stream.

- A decode instance added while 64 streams run takes new requests within ~2 s of registering;
  then the 64 clients walk away at once.
- A decode instance killed (-9) mid-stream: its streams end with an error within ~5 s, requests
  not yet streaming are retried on the other decode instance, and the prefill instance's leased
  blocks come back (released by the proxy, or at the latest when the lease expires).
- A prefill instance killed (-9): requests in flight are retried or fail cleanly, new ones go
  to the other prefill instance.
After each: no KV block leaked on any live instance, no process left behind.
"""

from __future__ import annotations

import asyncio
import time

import openai

from tests.servers import async_wait_for
from tests.test_disagg_e2e import MAX_TOKENS, model_dir  # noqa: F401
from tests.test_xpyd_e2e import PROMPTS, Progress, reference, stream  # noqa: F401
from tests.xpyd_cluster import xpyd_cluster


def _prefixes_match(result: tuple[str, list[int]], prompt: str, reference: dict,  # noqa: F811
                    max_tokens: int) -> bool:
    """A greedy completion of `max_tokens` whose first tokens are the reference's."""
    _, ids = result
    return len(ids) == max_tokens and ids[:MAX_TOKENS] == reference[prompt][1]


async def _timed(coro) -> tuple[object, float]:
    """(the result or the exception raised, when it ended)."""
    try:
        result: object = await coro
    except Exception as exc:
        result = exc
    return result, time.monotonic()


def _instance_ids(proxy) -> set[str]:
    """The instances the proxy has registered now."""
    return {line.split('instance="')[1].split('"')[0] for line in proxy.metrics().splitlines()
            if line.startswith("ppengine:proxy_instance_load{")}


def test_a_decode_instance_added_under_load_takes_requests_at_once(model_dir, reference,  # noqa: F811
                                                                   tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xpyd-join")
    with xpyd_cluster(model_dir, str(tmp)) as c:
        c.add("kv_producer", "PUT_ASYNC")
        c.add("kv_consumer")
        c.wait_registered()
        (proxy,) = c.proxies
        before = _instance_ids(proxy)
        short = PROMPTS[:4]

        async def scenario() -> tuple[tuple[str, list[int]], float]:
            client = proxy.async_client(timeout_s=120)
            progress = Progress()
            running = [asyncio.ensure_future(stream(client, short[i % 4], 600,
                                                    progress.track(i)))
                       for i in range(64)]
            await progress.until_streaming(64, min_tokens=1)  # the 64 streams are going
            c.add("kv_consumer")
            deadline = time.monotonic() + 120
            while not (new := _instance_ids(proxy) - before):
                assert time.monotonic() < deadline, c.logs()
                assert not any(job.done() for job in running), "a stream ended early"
                await asyncio.sleep(0.1)  # polls the proxy's registry
            (new_id,) = new
            # the very next request goes to the newcomer: the old decoder holds 64 streams
            # (counted, not timed: the prefill leg before it takes seconds on a busy host)
            extra = await stream(client, short[0])
            assert not any(job.done() for job in running), "a stream ended early"
            counted = proxy.metric(
                f'ppengine:proxy_requests_total{{instance="{new_id}",role="decode"}}')
            for job in running:  # 64 clients walk away at once: everything must come back
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await client.close()
            return extra, counted

        extra, counted = asyncio.run(scenario())
        assert counted == 1, "the request after the join did not go to the new decode instance"
        assert extra == reference[short[0]]
        c.wait_blocks_free()


def test_a_killed_decode_instance_fails_its_streams_fast_and_the_rest_is_retried(
        model_dir, reference, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("xpyd-dead-d")
    with xpyd_cluster(model_dir, str(tmp), heartbeat_timeout_s=3.0) as c:
        c.add("kv_producer", "GET", lease_ttl_s=3.0)
        doomed = c.add("kv_consumer")
        c.add("kv_consumer")
        c.wait_registered()
        (proxy,) = c.proxies
        progress = Progress()

        async def scenario() -> tuple[float, list, list]:
            client = proxy.async_client(timeout_s=120)
            streaming = [asyncio.ensure_future(_timed(stream(client, PROMPTS[i % 4], 300,
                                                             progress.track(i))))
                         for i in range(16)]
            await progress.until_streaming(16)
            doomed.proc.kill()
            killed_at = time.monotonic()
            late = [asyncio.ensure_future(_timed(stream(client, PROMPTS[i % 8])))
                    for i in range(8)]  # not streaming yet: retried on the other D
            results = await asyncio.gather(*streaming)
            late_results = await asyncio.gather(*late)
            await client.close()
            return killed_at, results, late_results

        killed_at, results, late_results = asyncio.run(scenario())
        failed = [(r, end) for r, end in results if isinstance(r, Exception)]
        assert 0 < len(failed) < len(results)  # the dead D's streams, and only those
        for error, end in failed:
            assert isinstance(error, openai.APIError) and end - killed_at < 6.0, error
        for i, (result, _) in enumerate(results):
            if not isinstance(result, Exception):
                assert _prefixes_match(result, PROMPTS[i % 4], reference, 300)
        for i, (result, _) in enumerate(late_results):
            assert result == reference[PROMPTS[i % 8]], result
        # P's leases for the dead D come back: released by the proxy when a decode leg failed
        # before D took the KV, else when they expire (3 s); nothing else leaks
        c.wait_blocks_free(timeout_s=20)


def test_a_killed_prefill_instance_is_routed_around(model_dir, reference,  # noqa: F811
                                                    tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xpyd-dead-p")
    with xpyd_cluster(model_dir, str(tmp), heartbeat_timeout_s=3.0) as c:
        doomed = c.add("kv_producer", "PUT")
        c.add("kv_producer", "GET")
        c.add("kv_consumer")
        c.wait_registered()
        (proxy,) = c.proxies

        async def scenario() -> tuple[list, list]:
            client = proxy.async_client(timeout_s=120)
            in_flight = [asyncio.ensure_future(_timed(stream(client, PROMPTS[i % 8])))
                         for i in range(16)]
            # killed once it has taken some of them (the proxy spreads them over both Ps)
            await async_wait_for(
                lambda: doomed.metric("ppengine:prompt_tokens_computed_total") > 0, 60,
                "the doomed prefill instance to take requests", c.logs)
            doomed.proc.kill()
            results = await asyncio.gather(*in_flight)
            after = await asyncio.gather(*(stream(client, PROMPTS[i % 8]) for i in range(8)))
            await client.close()
            return results, after

        results, after = asyncio.run(scenario())
        for i, (result, _) in enumerate(results):  # retried on the other P, or a clean error
            assert result == reference[PROMPTS[i % 8]] or (
                isinstance(result, openai.APIStatusError) and result.status_code in (502, 504)
            ), result
        assert after == [reference[PROMPTS[i % 8]] for i in range(8)]
        c.wait_blocks_free()
