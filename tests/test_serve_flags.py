"""The `pp-engine serve` flags vLLM users pass, each behaving as in vLLM: --tokenizer,
--chat-template, --generation-config, --max-logprobs, --enable-log-requests (and
--disable-log-requests), CORS (--allowed-origins ...), --root-path and TLS (--ssl-certfile ...).

Two servers for the module: `flagged` (a model directory without tokenizer files, and most of
the flags) and `tls` (https, every other flag at its default). Bad values are refused at
startup, in-process, before anything starts.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterator

import httpx
import openai
import pytest
from engine_core.models import load_tokenizer

from engine_core import LLM, SamplingParams
from engine_core.config import EngineArgs
from engine_core.entrypoints import cli
from engine_core.entrypoints.chat_template import load_chat_template
from engine_core.entrypoints.http.protocol import ChatCompletionRequest
from engine_core.entrypoints.input_processor import InputProcessor
from engine_core.generation_config import read_generation_defaults
from engine_core.validation import validate_sampling_params
from tests.checkpoints import make_checkpoint
from tests.servers import ServerProcess
from tests.text_checkpoint import add_tokenizer

MODEL = "tiny-llama"
TIMEOUT = 60.0
ALLOWED = "http://allowed.example"
DENIED = "http://denied.example"
# Renders only the messages' text: far fewer tokens than the model's own template.
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
GENERATION_CONFIG = {"temperature": 0.0, "top_k": 7, "repetition_penalty": 1.1,
                     "max_new_tokens": 5, "do_sample": True, "eos_token_id": 2}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[str, str]:
    """(a model directory without tokenizer files but with a generation_config.json, a
    directory with the tokenizer)."""
    root = tmp_path_factory.mktemp("serve-flags")
    full = add_tokenizer(make_checkpoint(str(root / "ckpt"), "llama"), str(root / "full"))
    bare = str(root / "bare")
    shutil.copytree(full, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(bare, name))
    with open(os.path.join(bare, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f)
    return bare, full


@pytest.fixture(scope="module")
def flagged(dirs, tmp_path_factory) -> Iterator[ServerProcess]:
    bare, tokenizer_dir = dirs
    log = str(tmp_path_factory.mktemp("flagged-log") / "server.log")
    proc = ServerProcess(bare, log, "--tokenizer", tokenizer_dir, "--chat-template", TEMPLATE,
                         "--max-logprobs", "3", "--enable-log-requests",
                         "--allowed-origins", json.dumps([ALLOWED]), "--root-path", "/api")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(flagged) -> openai.OpenAI:
    return openai.OpenAI(base_url=flagged.url + "/v1", api_key="none", max_retries=0,
                         timeout=TIMEOUT)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """(certificate file, key file): self-signed, for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = str(root / "cert.pem"), str(root / "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(dirs, certificate, tmp_path_factory) -> Iterator[ServerProcess]:
    _, full = dirs
    cert, key = certificate
    log = str(tmp_path_factory.mktemp("tls-log") / "server.log")
    proc = ServerProcess(full, log, "--ssl-certfile", cert, "--ssl-keyfile", key, tls_ca=cert)
    yield proc
    proc.stop()


def received_line(server: ServerProcess, request_id: str) -> str:
    """The --enable-log-requests line of one engine request."""
    lines = [line for line in server.log(full=True).splitlines()
             if f"Received request {request_id}:" in line]
    assert len(lines) == 1, server.log()
    return lines[0]


def param_in_log(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=([^,)]+)", line)
    assert match, line
    return match.group(1)


# ---- --tokenizer --------------------------------------------------------------------------
def test_tokenizer_from_another_directory(client, dirs):
    bare, _ = dirs
    assert not os.path.exists(os.path.join(bare, "tokenizer.json"))
    completion = client.completions.create(model=MODEL, prompt="def hello(world):",
                                           max_tokens=4, extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens > 1 and completion.choices[0].text
    chat = client.chat.completions.create(model=MODEL, max_tokens=3,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content is not None


def test_generate_takes_tokenizer(dirs, capsys):
    bare, full = dirs
    code = cli.main(["generate", bare, "def hello", "--tokenizer", full, "--max-tokens", "2",
                     "--dtype", "float32", "--max-model-len", "64", "--num-kv-blocks", "8"])
    assert code == 0
    assert capsys.readouterr().out.startswith("def hello")  # the prompt, then its text


# ---- --chat-template ----------------------------------------------------------------------
def test_chat_template_replaces_the_models(client, dirs):
    _, tokenizer_dir = dirs
    tokenizer = load_tokenizer(tokenizer_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, messages=messages)
    ours = tokenizer.encode("be brief\nhi\n", add_special_tokens=False)
    models = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert chat.usage.prompt_tokens == len(ours) != len(models)


def test_chat_template_file_or_inline(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE  # no such file, but Jinja: inline
    with pytest.raises(ValueError, match=r"chat_template .* looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match=r"chat_template does not parse \(line 1\)"):
        load_chat_template("{% for m in messages %}")


# ---- --generation-config ------------------------------------------------------------------
def test_generation_config_defaults_apply_to_fields_left_out(flagged, client):
    assert "default sampling params from" in flagged.log(full=True)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                  "content": "hi"}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5  # max_new_tokens
    line = received_line(flagged, chat.id)
    assert (param_in_log(line, "temperature"), param_in_log(line, "top_k"),
            param_in_log(line, "repetition_penalty")) == ("0.0", "7", "1.1")
    # values in the request win, the rest still come from the file
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                  "content": "hi"}],
                                          max_tokens=3, temperature=0.5,
                                          extra_body={"ignore_eos": True, "top_k": 2})
    assert chat.usage.completion_tokens == 3
    line = received_line(flagged, chat.id)
    assert (param_in_log(line, "temperature"), param_in_log(line, "top_k"),
            param_in_log(line, "repetition_penalty")) == ("0.5", "2", "1.1")


def test_generation_config_on_completions(flagged):
    body = {"model": MODEL, "prompt": "import", "ignore_eos": True}
    default_16 = httpx.post(flagged.url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert default_16.json()["usage"]["completion_tokens"] == 16  # the route's own default
    left_out = httpx.post(flagged.url + "/v1/completions", json={**body, "max_tokens": None},
                          timeout=TIMEOUT).json()
    assert left_out["usage"]["completion_tokens"] == 5
    assert param_in_log(received_line(flagged, left_out["id"] + "-0"), "top_k") == "7"


def test_generation_config_sources(dirs, tmp_path):
    bare, full = dirs
    expected = {"temperature": 0.0, "top_k": 7, "repetition_penalty": 1.1, "max_tokens": 5}

    def defaults(source: str) -> SamplingParams:
        config = EngineArgs(model=full, generation_config=source).resolve()
        return InputProcessor(config, None).default_sampling_params()

    assert defaults(bare) == SamplingParams(**expected)  # a folder
    assert defaults("vllm") == SamplingParams()
    assert defaults("auto") == SamplingParams(  # the model's file, as transformers saved it
        **read_generation_defaults(full))
    (tmp_path / "generation_config.json").write_text('{"temperature": -1}')
    with pytest.raises(ValueError, match=r"generation_config: .*temperature must be >= 0"):
        EngineArgs(model=full, generation_config=str(tmp_path)).resolve()


def test_offline_default_sampling_params(dirs):
    bare, full = dirs
    llm = LLM(bare, tokenizer=full, dtype="float32", max_model_len=64, num_kv_blocks=16)
    try:
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 7, 5)
        (output,) = llm.generate("import", use_tqdm=False)  # no params: these defaults
        assert len(output.outputs[0].token_ids) <= 5
    finally:
        llm.shutdown()


def test_request_fields_win_over_defaults():
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "temperature": 0.3})
    params = request.sampling_params(8, None, {"temperature": 0.0, "top_p": 0.5})
    assert (params.temperature, params.top_p, params.max_tokens) == (0.3, 0.5, 8)


# ---- --max-logprobs -----------------------------------------------------------------------
def test_max_logprobs_limits_both_routes(flagged, client):
    ok = client.completions.create(model=MODEL, prompt="import", max_tokens=2, logprobs=3)
    assert all(len(top) == 3 for top in ok.choices[0].logprobs.top_logprobs)
    for route, body, field in [
            ("/v1/completions", {"prompt": "import", "logprobs": 4}, "logprobs"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                      "logprobs": True, "top_logprobs": 4}, "top_logprobs")]:
        response = httpx.post(flagged.url + route, json={"model": MODEL, **body},
                              timeout=TIMEOUT)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and "--max-logprobs" in error["message"], error


def test_max_logprobs_above_the_default(dirs):
    _, full = dirs
    config = EngineArgs(model=full, max_logprobs=30).resolve()
    validate_sampling_params(SamplingParams(logprobs=30), config)
    with pytest.raises(ValueError, match=r"logprobs must be <= 30"):
        validate_sampling_params(SamplingParams(logprobs=31), config)
    with pytest.raises(ValueError, match=r"logprobs must be <= 20"):  # vLLM's default
        validate_sampling_params(SamplingParams(logprobs=21), EngineArgs(model=full).resolve())
    llm = LLM(full, dtype="float32", max_model_len=64, num_kv_blocks=16, max_logprobs=30)
    try:
        (output,) = llm.generate("import", SamplingParams(max_tokens=2, logprobs=25),
                                 use_tqdm=False)
        # each position: the top 25, plus the sampled token when it is not among them
        assert all(25 <= len(entry) <= 26 for entry in output.outputs[0].logprobs)
    finally:
        llm.shutdown()


# ---- --enable-log-requests ----------------------------------------------------------------
def test_requests_logged_only_when_enabled(flagged, client, tls):
    completion = client.completions.create(model=MODEL, prompt="import", max_tokens=2)
    line = received_line(flagged, completion.id + "-0")
    assert param_in_log(line, "prompt_tokens") == str(completion.usage.prompt_tokens)
    assert f"{completion.id}-0 finished (length)" in flagged.log(full=True)
    response = httpx.post(tls.url + "/v1/completions", verify=tls.verify, timeout=TIMEOUT,
                          json={"model": MODEL, "prompt": "import", "max_tokens": 2})
    assert response.status_code == 200
    assert "Received request" not in tls.log(full=True)  # vLLM's default: off
    assert " finished (" not in tls.log(full=True)


# ---- CORS ---------------------------------------------------------------------------------
@pytest.mark.parametrize("origin, allowed", [(ALLOWED, True), (DENIED, False)])
def test_cors_preflight_and_simple_request(flagged, origin, allowed):
    preflight = httpx.options(flagged.url + "/v1/chat/completions", timeout=TIMEOUT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert preflight.status_code == (200 if allowed else 400), preflight.text
    assert preflight.headers.get("access-control-allow-origin") == (origin if allowed else None)
    simple = httpx.get(flagged.url + "/v1/models", headers={"Origin": origin}, timeout=TIMEOUT)
    assert simple.status_code == 200
    assert simple.headers.get("access-control-allow-origin") == (origin if allowed else None)


def test_cors_allows_any_origin_by_default(tls):
    response = httpx.get(tls.url + "/v1/models", headers={"Origin": DENIED},
                         verify=tls.verify, timeout=TIMEOUT)
    assert response.headers.get("access-control-allow-origin") == "*"


# ---- --root-path --------------------------------------------------------------------------
def test_root_path(flagged):
    for path in ("/v1/models", "/api/v1/models"):  # a proxy may strip the prefix or not
        response = httpx.get(flagged.url + path, timeout=TIMEOUT)
        assert response.status_code == 200 and response.json()["data"][0]["id"] == MODEL
    docs = httpx.get(flagged.url + "/docs", timeout=TIMEOUT)
    assert "'/api/openapi.json'" in docs.text
    schema = httpx.get(flagged.url + "/openapi.json", timeout=TIMEOUT).json()
    assert schema["servers"] == [{"url": "/api"}]


# ---- TLS ----------------------------------------------------------------------------------
def test_tls_with_the_openai_client(tls):
    client = openai.OpenAI(base_url=tls.url + "/v1", api_key="none", max_retries=0,
                           timeout=TIMEOUT, http_client=httpx.Client(verify=tls.verify))
    completion = client.completions.create(model=MODEL, prompt="import", max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3
    with pytest.raises(httpx.TransportError):  # plain http to the TLS port
        httpx.get(tls.url.replace("https://", "http://") + "/health", timeout=TIMEOUT)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls.url + "/health", timeout=TIMEOUT)  # not a certificate the system trusts


# ---- startup errors -----------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "/nonexistent"], "argument --tokenizer: tokenizer must be a directory"),
    (["--chat-template", "{% if %}"], "argument --chat-template: chat_template does not parse"),
    (["--chat-template", "missing.jinja"], "argument --chat-template: chat_template "
                                           "'missing.jinja' looks like a file path"),
    (["--generation-config", "/nonexistent"], "argument --generation-config: generation_config "
                                              "must be 'auto', 'vllm' or a directory"),
    (["--max-logprobs", "-1"], "argument --max-logprobs: must be an integer >= 0"),
    (["--allowed-origins", "*"], "argument --allowed-origins: must be a JSON list of strings"),
    (["--allowed-headers", '{"a": 1}'], "argument --allowed-headers: must be a JSON list"),
    (["--root-path", "api"], "--root-path must start with '/'"),
    (["--ssl-keyfile", "key.pem"], "--ssl-keyfile needs --ssl-certfile"),
    (["--ssl-certfile", "/nonexistent.pem"], "--ssl-certfile '/nonexistent.pem': cannot load"),
    (["--ssl-cert-reqs", "3"], "argument --ssl-cert-reqs: must be an integer in [0, 2]"),
])
def test_bad_values_refused_at_startup(argv, message, capsys):
    try:
        code = cli.main(["serve", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_both_log_request_flags_accepted():
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).enable_log_requests is False
    assert parser.parse_args(["serve", "--enable-log-requests"]).enable_log_requests is True
    assert parser.parse_args(["serve", "--disable-log-requests"]).enable_log_requests is False
