"""`sdrt serve`: the real `openai` and `webuiapi` clients against a live uvicorn server on a loopback port
(the built-in default model, few steps), bad requests, the API key, the queue, batching, dropped clients,
metrics, SIGTERM, and Ray Serve."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

from sdrt.runtime import a1111  # noqa: E402
from sdrt.runtime.default_model import default_model_dir  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "a red circle on a blue background"

if default_model_dir() is None:
    pytest.skip("the built-in default model is not installed", allow_module_level=True)


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="session")
def server():
    """A live server (uvicorn in a thread) on a loopback port: small limits, so that they can be hit."""
    import uvicorn

    from sdrt.serve.app import ServeConfig, create_app
    from sdrt.serve.common import Limits

    config = ServeConfig(api_key=KEY, max_queue=3, max_batch=4,
                         limits=Limits(max_images=4, max_width=256, max_height=256, max_steps=400,
                                       max_body_bytes=4 << 20))
    app = create_app(config)
    sock = _free_socket()
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", http="h11"))  # what a bare uvicorn install runs
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)

    class Live:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        port = sock.getsockname()[1]
        service = app.state.service

        def post(self, path, body=None, headers=AUTH, **kw):
            return requests.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

        def get(self, path, headers=AUTH):
            return requests.get(self.url + path, headers=headers, timeout=60)

        def wait_running(self, timeout=30):
            """Until the worker is in a Pipeline call."""
            deadline = time.monotonic() + timeout
            while self.service.progress["steps"] == 0:
                assert time.monotonic() < deadline, "nothing started running"
                time.sleep(0.01)

    yield Live()
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="session")
def pipe():
    """The reference: the same model in this process, called directly."""
    from sdrt.runtime.pipeline import Pipeline

    return Pipeline.load(default_model_dir())


def _pixels(image) -> np.ndarray:
    if isinstance(image, str):
        image = Image.open(io.BytesIO(base64.b64decode(image)))
    return np.asarray(image.convert("RGB"))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _openai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


# ----------------------------------------------------------------------------------------------- OpenAI


def test_openai_client_generates_the_pipelines_images(server, pipe):
    pytest.importorskip("openai")
    r = _openai(server).images.generate(prompt=PROMPT, n=2, size="128x128", response_format="b64_json",
                                        extra_body={"seed": 7, "steps": 4})
    assert r.created > 0 and len(r.data) == 2
    expected = pipe(PROMPT, seed=7, num_inference_steps=4, num_images_per_prompt=2).images
    for got, want in zip(r.data, expected):
        assert np.array_equal(_pixels(got.b64_json), np.asarray(want))


def test_openai_client_edits_an_image_with_and_without_a_mask(server, pipe):
    pytest.importorskip("openai")
    client = _openai(server)
    init = pipe(PROMPT, seed=1, num_inference_steps=4).images[0]
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (32, 32, 96, 96))
    r = client.images.edit(image=("init.png", _png(init), "image/png"), mask=("mask.png", _png(mask), "image/png"),
                           prompt="a yellow star", size="128x128", extra_body={"seed": 3, "steps": 4})
    want = pipe("a yellow star", image=init, mask_image=mask, seed=3, num_inference_steps=4).images[0]
    assert np.array_equal(_pixels(r.data[0].b64_json), np.asarray(want))
    r = client.images.edit(image=("init.png", _png(init), "image/png"), prompt="a green square",
                           extra_body={"seed": 3, "steps": 4, "strength": 0.6})
    want = pipe("a green square", image=init, strength=0.6, seed=3, num_inference_steps=4).images[0]
    assert np.array_equal(_pixels(r.data[0].b64_json), np.asarray(want))


def test_openai_url_response_format_is_refused_with_a_message(server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        _openai(server).images.generate(prompt=PROMPT, response_format="url")


# ----------------------------------------------------------------------------------------------- AUTOMATIC1111


def _webui(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=4)
    api.set_auth("sdrt", KEY)  # HTTP Basic with the key as password, as the webui's --api-auth
    return api


def test_webuiapi_txt2img_gives_image_i_the_seed_plus_i(server, pipe):
    res = _webui(server).txt2img(prompt="a (blue:1.2) star", negative_prompt="green", seed=11, batch_size=2,
                                 cfg_scale=2, width=128, height=128, sampler_name="Euler a")
    assert res.info["all_seeds"] == [11, 12] and res.info["seed"] == 11
    assert res.info["sampler_name"] == "Euler a" and res.info["steps"] == 4
    assert res.info["infotexts"][1].splitlines()[1] == "Negative prompt: green"
    assert "Seed: 12" in res.info["infotexts"][1] and res.parameters["batch_size"] == 2
    for image, seed in zip(res.images, (11, 12)):
        want = pipe("a (blue:1.2) star", negative_prompt="green", seed=seed, num_inference_steps=4,
                    guidance_scale=2, scheduler="euler-a", prompt_syntax="a1111").images[0]
        assert np.array_equal(_pixels(image), np.asarray(want))
        assert "Seed: " in image.info["parameters"]  # the webui's infotext in the PNG


def test_webuiapi_img2img_and_inpainting(server, pipe):
    api = _webui(server)
    init = pipe(PROMPT, seed=2, num_inference_steps=4).images[0]
    res = api.img2img(images=[init], prompt="a green square", denoising_strength=0.5, seed=4, width=128,
                      height=128, sampler_name="DPM++ 2M", cfg_scale=2)
    want = pipe("a green square", image=init, strength=0.5, seed=4, num_inference_steps=4, guidance_scale=2,
                scheduler="dpm++2m", prompt_syntax="a1111").images[0]
    assert np.array_equal(_pixels(res.images[0]), np.asarray(want))
    assert res.info["denoising_strength"] == 0.5 and res.parameters["init_images"] is None
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (0, 0, 64, 128))
    res = api.img2img(images=[init], mask_image=mask, prompt="a star", denoising_strength=1.0, seed=5,
                      width=128, height=128, sampler_name="DPM++ 2M", cfg_scale=2)
    want = pipe("a star", image=init, mask_image=mask, strength=1.0, seed=5, num_inference_steps=4, guidance_scale=2,
                scheduler="dpm++2m", prompt_syntax="a1111").images[0]
    assert np.array_equal(_pixels(res.images[0]), np.asarray(want))


def test_webuiapi_lists_samplers_models_and_progress(server):
    api = _webui(server)
    assert api.get_samplers() == a1111.samplers()
    models = api.get_sd_models()
    assert models[0]["model_name"] == "default-model" and models[0]["title"].startswith("default-model [")
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["sampling_steps"] == 0


# ----------------------------------------------------------------------------------------------- bad requests

GEN, T2I, I2I = "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
BAD = [
    (GEN, b"{\"prompt\": ", "not valid JSON"),
    (GEN, {}, "prompt is required"),
    (GEN, {"prompt": 5}, "prompt: Input should be a valid string"),
    (GEN, {"prompt": PROMPT, "n": "two"}, "n: Input should be a valid integer"),
    (GEN, {"prompt": PROMPT, "n": 0}, "n must be at least 1, got 0"),
    (GEN, {"prompt": PROMPT, "n": 5}, "limit of 4 a request (--max-images)"),
    (GEN, {"prompt": PROMPT, "size": "100x128"}, "width 100 is not a multiple of 8; use 96 or 104"),
    (GEN, {"prompt": PROMPT, "size": "big"}, "size must be 'WIDTHxHEIGHT'"),
    (GEN, {"prompt": PROMPT, "size": "512x512"}, "limit 256x256 (--max-size)"),
    (GEN, {"prompt": PROMPT, "steps": 0}, "steps must be at least 1, got 0"),
    (GEN, {"prompt": PROMPT, "steps": 401}, "limit of 400 (--max-steps)"),
    (GEN, {"prompt": PROMPT, "scheduler": "k_euler"}, "scheduler 'k_euler' is not one sdrt has"),
    (GEN, {"prompt": "  "}, "prompt must not be empty"),
    (T2I, {"negative_prompt": "x"}, "prompt is required"),
    (T2I, {"prompt": PROMPT, "batch_size": 0}, "batch_size must be at least 1, got 0"),
    (T2I, {"prompt": PROMPT, "batch_size": 2, "n_iter": 3}, "batch_size x n_iter 6 is more images"),
    (T2I, {"prompt": PROMPT, "width": 100}, "width 100 is not a multiple of 8"),
    (T2I, {"prompt": PROMPT, "steps": -1}, "steps must be at least 1"),
    (T2I, {"prompt": PROMPT, "sampler_name": "DPM fast"}, "sampler 'DPM fast' is not one sdrt has"),
    (T2I, {"prompt": PROMPT, "cfg_scale": "high"}, "cfg_scale: Input should be a valid number"),
    (T2I, {"prompt": PROMPT, "enable_hr": True}, "enable_hr is not supported"),
    (T2I, [PROMPT], "the request body: Input should be a valid dictionary"),
    (I2I, {"prompt": PROMPT}, "init_images is required"),
    (I2I, {"prompt": PROMPT, "init_images": ["bm90IGFuIGltYWdl"]}, "init_images[0] is not an image"),
    (I2I, {"prompt": PROMPT, "init_images": ["x"], "denoising_strength": 0}, "denoising_strength must be in (0, 1]"),
]


@pytest.mark.parametrize("path,body,message", BAD, ids=[f"{p}:{m[:30]}" for p, _, m in BAD])
def test_bad_request_is_a_400_saying_what_was_wrong(server, path, body, message):
    if path == I2I and "init_images" in (body if isinstance(body, dict) else {}) and body["init_images"] == ["x"]:
        body = {**body, "init_images": [base64.b64encode(_png(Image.new("RGB", (128, 128)))).decode()]}
    if isinstance(body, bytes):
        r = requests.post(server.url + path, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    else:
        r = server.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert message in err["error"]["message"] and err["detail"] == err["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_a_413_and_the_server_keeps_serving(server, chunked):
    body = b'{"prompt": "' + b"x" * (5 << 20) + b'"}'  # 5 MiB; the test server takes 4
    data = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
    r = requests.post(server.url + GEN, data=data, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"]
    assert "limit of 4 MiB (--max-body-mib)" in message and ("5.0 MiB" in message or chunked)
    assert server.post(GEN, {"prompt": PROMPT, "steps": 2}).status_code == 200


def test_edit_without_an_image_is_a_400(server):
    r = requests.post(server.url + "/v1/images/edits", data={"prompt": PROMPT}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "image is required" in r.json()["error"]["message"]


def test_a_failing_request_does_not_take_the_worker_down(server):
    long = ", ".join(["a red circle on a blue background"] * 20)  # past 75 tokens: this UNet takes 77 only
    r = server.post(T2I, {"prompt": long, "steps": 2})
    assert r.status_code == 400 and "re-export" in r.json()["detail"]
    assert server.post(GEN, {"prompt": PROMPT, "steps": 2}).status_code == 200


# ----------------------------------------------------------------------------------------------- API key


def test_every_route_but_health_needs_the_api_key(server):
    assert server.get("/health", headers={}).status_code == 200
    for path in ("/metrics", "/sdapi/v1/samplers", "/v1/models"):
        r = server.get(path, headers={})
        assert r.status_code == 401 and "no API key was given" in r.json()["error"]["message"]
    r = server.post(GEN, {"prompt": PROMPT}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert server.get("/v1/models").status_code == 200


# ----------------------------------------------------------------------------------------------- queue, batching


def test_a_full_queue_answers_503_with_retry_after(server):
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(server.post, GEN, {"prompt": PROMPT, "steps": 60, "seed": 0})
        server.wait_running()
        queued = [pool.submit(server.post, GEN, {"prompt": PROMPT, "steps": 1, "seed": i}) for i in range(3)]
        deadline = time.monotonic() + 10
        while server.service.queued < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = server.post(GEN, {"prompt": PROMPT, "steps": 1})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "--max-queue" in r.json()["error"]["message"]
        assert blocker.result().status_code == 200 and all(q.result().status_code == 200 for q in queued)


def test_batched_requests_get_the_images_they_get_alone(server, pipe):
    asks = [("a small blue star above a red square", 3, 1), ("a yellow cross on the left", 4, 2), (PROMPT, 5, 1)]
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(server.post, GEN, {"prompt": PROMPT, "steps": 40})
        server.wait_running()
        futures = []
        for prompt, seed, n in asks:
            futures.append(pool.submit(server.post, GEN, {"prompt": prompt, "seed": seed, "n": n, "steps": 4}))
            time.sleep(0.05)
        assert blocker.result().status_code == 200
        answers = [f.result().json() for f in futures]
    for (prompt, seed, n), answer in zip(asks, answers):
        assert answer["sdrt"]["batch_images"] == 4  # all three shared one Pipeline call
        alone = pipe(prompt, seed=seed, num_images_per_prompt=n, num_inference_steps=4).images
        for got, want in zip(answer["data"], alone):
            assert np.array_equal(_pixels(got["b64_json"]), np.asarray(want))


def test_a_disconnected_client_has_its_request_dropped(server):
    before = _metric(server, 'sdrt_errors_total{kind="dropped",route="/v1/images/generations"}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", GEN, json.dumps({"prompt": PROMPT, "steps": 400}),
                 {**AUTH, "Content-Type": "application/json"})
    server.wait_running()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.monotonic()
    while server.service.progress["steps"]:  # 400 steps would take ~10 s
        assert time.monotonic() - t0 < 5, "the dropped request kept running"
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while _metric(server, 'sdrt_errors_total{kind="dropped",route="/v1/images/generations"}') != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.post(GEN, {"prompt": PROMPT, "steps": 2}).status_code == 200


# ----------------------------------------------------------------------------------------------- metrics


def _metric(server, line_start: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_requests_images_errors_and_latency(server):
    server.post(GEN, {"prompt": PROMPT, "steps": 2, "n": 2})
    server.post(GEN, {"prompt": PROMPT, "n": 0})
    text = server.get("/metrics").text
    assert 'sdrt_requests_total{route="/v1/images/generations",status="200"}' in text
    assert 'sdrt_requests_total{route="/v1/images/generations",status="400"}' in text
    assert 'sdrt_errors_total{kind="bad_request",route="/v1/images/generations"}' in text
    assert 'sdrt_request_seconds_bucket{le="0.5",route="/v1/images/generations"}' in text
    assert _metric(server, 'sdrt_images_generated_total{route="/v1/images/generations"}') >= 2
    assert "sdrt_queue_depth 0.0" in text and "sdrt_batch_images_count" in text
    assert _metric(server, "process_resident_memory_bytes") > 0


# ----------------------------------------------------------------------------------------------- the process


def test_serve_without_the_extra_says_what_to_install(tmp_path):
    block = ("import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('fastapi', 'uvicorn'):\n            raise ImportError(name)\n"
             "sys.meta_path.insert(0, B())\n"
             "import sdrt.runtime.pipeline, sdrt.cli\nassert 'fastapi' not in sys.modules\n"
             "sys.argv = ['sdrt', 'serve']\nsys.exit(sdrt.cli.main())\n")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == ("sdrt serve: error: `sdrt serve` needs the serve extra: "
                                                      "pip install 'sdrt[serve]'")


@pytest.mark.slow
def test_sigterm_finishes_running_requests_refuses_queued_ones_and_exits_0(tmp_path):
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt", "serve", "--port", str(port), "--max-steps", "1000",
                             "--max-batch", "1", "--log-level", "warning"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.1)
        post = lambda steps: requests.post(url + GEN, json={"prompt": PROMPT, "steps": steps}, timeout=60)  # noqa: E731
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(post, 120)
            deadline = time.monotonic() + 30
            while requests.get(url + "/sdapi/v1/progress", timeout=5).json()["state"]["sampling_steps"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            queued = [pool.submit(post, 1) for _ in range(2)]
            while requests.get(url + "/health", timeout=5).json()["queued"] < 2:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert [q.result().status_code for q in queued] == [503, 503]
            assert "shutting down" in queued[0].result().json()["error"]["message"]
            assert running.result().status_code == 200 and len(running.result().json()["data"]) == 1
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------- Ray Serve


@pytest.mark.slow
@pytest.mark.ray
def test_ray_serve_runs_the_app_on_two_replicas(pipe):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from sdrt.serve.app import ServeConfig
    from sdrt.serve.ray_app import APP_NAME, DEPLOYMENT_NAME, deploy

    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        deploy(ServeConfig(api_key=KEY), replicas=2, port=port, replica_cpus=0.5)
        status = serve.status().applications[APP_NAME]
        replicas = status.deployments[DEPLOYMENT_NAME].replica_states
        assert status.status == "RUNNING" and replicas.get("RUNNING") == 2
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda seed: requests.post(url + GEN, json={"prompt": PROMPT, "seed": seed,
                                                                                 "steps": 4}, headers=AUTH, timeout=120),
                                    range(4)))
        for seed, r in enumerate(answers):
            assert r.status_code == 200, r.text
            want = pipe(PROMPT, seed=seed, num_inference_steps=4).images[0]
            assert np.array_equal(_pixels(r.json()["data"][0]["b64_json"]), np.asarray(want))
        r = requests.post(url + T2I, json={"prompt": PROMPT, "steps": 2, "seed": 1}, headers=AUTH, timeout=120)
        assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [1]
        assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
        assert requests.get(url + "/metrics", timeout=30).status_code == 401
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
