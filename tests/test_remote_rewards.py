"""Rewards from a server (cdalign.rewards.remote, cdalign.rewards.serve; docs/guides/remote_rewards.md):
the protocol round trip, timeouts and retries with backoff, answers that are refused (wrong length,
non-finite, another request's id, an HTTP error), ``on_error: skip``, the config's checks, the
statistics' key, a server killed mid-run (retried: the run is unchanged), a run stopped by a dead
server (``error:`` line, exit 1, resumed from its checkpoint exactly), and the served JPEG constraint
of the tiny policy-gradient run giving the in-process run's scores and λ exactly.

Every server is on the loopback interface, started and stopped here (threads, or a subprocess for
``python -m cdalign.rewards.serve``), on a free port."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from cdalign.rewards import build_reward
from cdalign.rewards.remote import (
    RemoteReward,
    RemoteRewardError,
    RemoteRewardSpec,
    RemoteRewardWarning,
    decode_images,
    encode_images,
)
from cdalign.rewards.serve import RewardServer
from cdalign.runs.fingerprints import reward_identity

ROOT = Path(__file__).resolve().parents[1]
JPEG = "jpeg_compressibility"


def _images(n=5, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url, **kw) -> RemoteReward:
    return RemoteReward("jpeg_served", RemoteRewardSpec(url=url, **{"timeout": 5.0, "backoff": 0.01, **kw}))


@contextlib.contextmanager
def _scripted_server(answer):
    """A loopback server whose /score answer is ``answer(request, n) -> (status, body, delay_s)``
    (``n`` counts the requests from 1; ``body`` a dict sent as JSON, or bytes as they are)."""
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            count[0] += 1
            status, body, delay = answer(request, count[0])
            time.sleep(delay)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", count
    finally:
        httpd.shutdown()
        httpd.server_close()


def _ok(request, n):
    return 200, {"request_id": request["request_id"], "scores": [0.5] * len(request["images"])}, 0.0


# ----------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_protocol_round_trip_scores_as_in_process_in_batches(encoding):
    jpeg = build_reward(JPEG)
    images, prompts = _images(7), [f"p{i}" for i in range(7)]
    with RewardServer(jpeg, JPEG, port=0, version="v7") as server:
        client = _client(server.url, batch_size=3, encoding=encoding, concurrency=2)
        scores = client(images, prompts)
        assert client.health() == {"reward": JPEG, "version": "v7", "protocol": 1}
        assert server.requests == 3 and client.counts == {"requests": 3, "retries": 0, "skipped_batches": 0}
    # JPEG sizes quantise to 8 bits as PNG does: both encodings give the in-process scores exactly
    assert scores.dtype == torch.float32 and torch.equal(scores, jpeg(images, prompts))


def test_png_is_8_bit_and_npy_is_exact_for_a_float_reward():
    brightness = build_reward("brightness")
    images = _images(4)
    with RewardServer(brightness, "brightness", port=0) as server:
        exact = _client(server.url, encoding="npy")(images, None)
        quantised = _client(server.url, encoding="png")(images, None)
    assert torch.equal(exact, brightness(images, None))
    eight_bit = (images * 255).round().clamp(0, 255) / 255
    assert torch.allclose(quantised, brightness(eight_bit, None), atol=1e-6)
    assert torch.equal(decode_images(encode_images(images, "npy"), "npy"), images)


def test_prompts_reach_the_scorer_in_order_with_their_images():
    seen = []

    def scorer(images, prompts):
        seen.extend(prompts)
        return [float(p.split()[-1]) + float(images[i].mean()) * 0 for i, p in enumerate(prompts)]

    with RewardServer(scorer, "echo", port=0) as server:
        scores = _client(server.url, batch_size=2, concurrency=3)(_images(5), [f"image {i}" for i in range(5)])
    assert scores.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and sorted(seen) == [f"image {i}" for i in range(5)]


# ----------------------------------------------------------------------------- faults
def test_a_slow_server_times_out_and_the_error_names_reward_url_and_batch():
    with _scripted_server(lambda r, n: (*_ok(r, n)[:2], 1.0)) as (url, count):
        client = _client(url, timeout=0.2, retries=1)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as err:
            client(_images(3), None)
    message = str(err.value)
    assert f"remote reward 'jpeg_served' at {url}" in message and "batch 1/1 (images 0..2)" in message
    assert "no answer within timeout 0.2 s" in message and "failed 2 times" in message
    assert count[0] == 2 and time.monotonic() - start < 5


def test_a_failing_server_is_retried_with_exponential_backoff():
    def flaky(request, n):
        return (503, {"error": "warming up"}, 0.0) if n <= 3 else _ok(request, n)

    with _scripted_server(flaky) as (url, count):
        client = _client(url, retries=3, backoff=0.1)
        start = time.monotonic()
        scores = client(_images(2), None)
        elapsed = time.monotonic() - start
    assert scores.tolist() == [0.5, 0.5] and count[0] == 4
    assert client.counts == {"requests": 4, "retries": 3, "skipped_batches": 0}
    assert elapsed >= 0.1 + 0.2 + 0.4  # waits double


def test_a_dead_server_fails_after_its_retries():
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    client = _client(url, retries=2)
    with pytest.raises(RemoteRewardError, match=r"failed 3 times .*retries 2.*last: .*(Refused|refused)"):
        client(_images(2), None)
    assert client.counts["requests"] == 3


@pytest.mark.parametrize("answer, message", [
    (lambda r: {"request_id": r["request_id"], "scores": [1.0]}, r"has 1 scores for 3 images"),
    (lambda r: {"request_id": r["request_id"], "scores": [1.0, float("nan"), 2.0]}, r"non-finite .*\[1\] = nan"),
    (lambda r: {"request_id": r["request_id"], "scores": [1.0, None, "2"]}, r"2 non-finite or non-numeric .*\[1\] = None"),
    (lambda r: {"request_id": "someone-else", "scores": [1.0, 2.0, 3.0]}, r"names request_id 'someone-else', not this"),
    (lambda r: b"<html>oops</html>", r"is not JSON"),
    (lambda r: [1.0, 2.0, 3.0], r"is list, not a JSON object"),
])
def test_a_wrong_answer_stops_with_a_message_and_is_not_retried(answer, message):
    with _scripted_server(lambda r, n: (200, answer(r), 0.0)) as (url, count):
        with pytest.raises(RemoteRewardError, match=message) as err:
            _client(url, retries=3)(_images(3), None)
    assert f"remote reward 'jpeg_served' at {url}: batch 1/1" in str(err.value) and count[0] == 1


def test_an_http_client_error_is_not_retried_and_names_the_server():
    with _scripted_server(lambda r, n: (400, {"error": "images[0]: not a base64 png image"}, 0.0)) as (url, count):
        with pytest.raises(RemoteRewardError, match=r"HTTP 400 .*not a base64 png image") as err:
            _client(url, retries=3)(_images(2), None)
    assert url in str(err.value) and count[0] == 1


def test_the_reference_server_answers_a_failing_scorer_with_500_and_bad_requests_with_400():
    def broken(images, prompts):
        raise RuntimeError("model not loaded")

    with RewardServer(broken, "broken", port=0) as server:
        with pytest.raises(RemoteRewardError, match=r"HTTP 500 .*scorer 'broken' failed: RuntimeError: model not loaded"):
            _client(server.url, retries=1)(_images(2), None)
        body = json.dumps({"request_id": "x", "images": ["not base64!"]}).encode()
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server.url + "/score", data=body), timeout=5)
        assert err.value.code == 400 and "images[0]: not a base64 png image" in err.value.read().decode()


def test_on_error_skip_scores_the_batch_nan_warns_and_counts_it():
    def second_batch_wrong(request, n):
        return (200, {"request_id": "wrong", "scores": [0.0] * len(request["images"])}, 0.0) if n == 2 else _ok(request, n)

    with _scripted_server(second_batch_wrong) as (url, _):
        client = _client(url, batch_size=2, on_error="skip")
        with pytest.warns(RemoteRewardWarning, match=r"batch 2/3 .*on_error: skip.*so far: 1"):
            scores = client(_images(5), None)
    assert scores[:2].tolist() == [0.5, 0.5] and scores[2:4].isnan().all() and scores[4] == 0.5
    assert client.counts["skipped_batches"] == 1


# ----------------------------------------------------------------------------- config
def _pg(tmp_path, served: str | None = None, **kw):
    """The tiny policy-gradient run: JPEG compressibility (in-process, or served at ``served``)
    and a brightness guard, as the packaged recipe tiny/policy_gradient, at tiny size."""
    name = "jpeg_served" if served else JPEG
    base = dict(estimator="policy_gradient", images_per_prompt=2, backprop_steps=4, num_inference_steps=3,
                max_steps=3, save_steps=1, dual={"optimizer": "ascent", "lr": 0.5, "init": 0.5},
                constraints=[{"reward": name, "direction": "high", "threshold": 0.5},
                             {"reward": "brightness", "direction": "high", "threshold": -0.2}])
    if served:
        base["remote_rewards"] = {"jpeg_served": {"url": served, "cache_key": "v1", "timeout": 5.0, "retries": 6,
                                                  "backoff": 0.1}}
    base.update(kw)
    return tiny_config(tmp_path, **base)


@pytest.mark.parametrize("spec, message", [
    ({"url": "ftp://host/x"}, r"remote_rewards\.js\.url: 'ftp://host/x' is not an http:// or https:// URL"),
    ({"url": "http://h:1", "batch_size": 0}, r"remote_rewards\.js\.batch_size: 0 is out of range; must be >= 1"),
    ({"url": "http://h:1", "timeout": 0}, r"remote_rewards\.js\.timeout: 0.0 is out of range; must be > 0"),
    ({"url": "http://h:1", "retries": -1}, r"remote_rewards\.js\.retries: -1 is out of range"),
    ({"url": "http://h:1", "encoding": "jpg"}, r"remote_rewards\.js\.encoding: 'jpg' is not allowed .*'png', 'npy'"),
    ({"url": "http://h:1", "on_error": "ignore"}, r"remote_rewards\.js\.on_error: 'ignore' is not allowed"),
    ({"batch_size": 4}, r"remote_rewards\.js\.url: required"),
])
def test_a_bad_remote_reward_is_refused_naming_the_field(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        _pg(tmp_path, remote_rewards={"js": spec}, constraints=[{"reward": "js", "direction": "high", "threshold": 0.5}])


def test_remote_names_are_reward_names_of_the_run_and_nothing_else(tmp_path):
    cfg = _pg(tmp_path, served="http://127.0.0.1:8765")
    assert cfg.remote_rewards["jpeg_served"].batch_size == 16 and cfg.constraints[0].reward == "jpeg_served"
    with pytest.raises(ValueError, match=r"constraints\[0\]\.reward: unknown reward 'jpeg_served'.*remote_rewards"):
        _pg(tmp_path, constraints=[{"reward": "jpeg_served", "direction": "high", "threshold": 0.5}])
    with pytest.raises(ValueError, match=r"remote_rewards\.saturation: 'saturation' is a registered reward"):
        _pg(tmp_path, remote_rewards={"saturation": {"url": "http://h:1"}})
    with pytest.raises(ValueError, match=r"reward_kwargs\.jpeg_served: 'jpeg_served' is a remote reward"):
        _pg(tmp_path, served="http://h:1", reward_kwargs={"jpeg_served": {"quality": 90}})
    cfg.remote_rewards = {"other": {"url": "http://h:2"}}  # a mapping assigned is converted like YAML
    assert isinstance(cfg.remote_rewards["other"], RemoteRewardSpec)


def test_reward_backprop_refuses_a_remote_reward_with_its_message(tmp_path):
    from cdalign import ConstrainedDDPOTrainer

    cfg = tiny_config(tmp_path, remote_rewards={"jpeg_served": {"url": "http://127.0.0.1:9"}},
                      constraints=[{"reward": "jpeg_served", "direction": "high", "threshold": 0.5}])
    with pytest.raises(ValueError, match=r"'jpeg_served' is not differentiable.*estimator: policy_gradient"):
        ConstrainedDDPOTrainer(cfg)


def test_statistics_key_is_name_cache_key_and_encoding_not_the_url():
    def key(**kw):
        return reward_identity("jpeg_served", RemoteReward("jpeg_served", RemoteRewardSpec(**kw)))

    assert key(url="http://a:1", cache_key="v1") == key(url="https://b.example:2", cache_key="v1", timeout=3, retries=0)
    assert key(url="http://a:1", cache_key="v1") != key(url="http://a:1", cache_key="v2")
    assert key(url="http://a:1", cache_key="v1") != key(url="http://a:1", cache_key="v1", encoding="npy")
    assert key(url="http://a:1") is None  # no cache_key: recomputed every run, never reused


def test_a_resume_may_move_the_server_but_not_change_the_scorer(tmp_path):
    from cdalign.alignment.checkpoint import check_resume_config
    from cdalign.alignment.config import save_config

    save_config(_pg(tmp_path, served="http://127.0.0.1:8765"), tmp_path / "config.yaml")
    check_resume_config(tmp_path, _pg(tmp_path, served="http://10.0.0.2:9000", remote_rewards={
        "jpeg_served": {"url": "http://10.0.0.2:9000", "cache_key": "v1", "timeout": 60.0, "batch_size": 4}}))
    with pytest.raises(ValueError, match=r"remote_rewards\.jpeg_served\.cache_key: 'v1' in the checkpoint, 'v2' now"):
        check_resume_config(tmp_path, _pg(tmp_path, remote_rewards={
            "jpeg_served": {"url": "http://127.0.0.1:8765", "cache_key": "v2"}},
            constraints=[{"reward": "jpeg_served", "direction": "high", "threshold": 0.5},
                         {"reward": "brightness", "direction": "high", "threshold": -0.2}]))


# ----------------------------------------------------------------------------- the command line server
def _start_cli_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "cdalign.rewards.serve", JPEG, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving reward ... on http://127.0.0.1:<port> ..." once it listens
    assert f"on http://127.0.0.1:{port}" in line, line + proc.stderr.read()
    return proc


def test_the_command_line_server_killed_and_restarted_is_retried():
    port = _free_port()
    images, prompts = _images(4), ["a"] * 4
    server = _start_cli_server(port)
    try:
        client = _client(f"http://127.0.0.1:{port}", retries=8, backoff=0.25)
        assert torch.equal(client(images, prompts), build_reward(JPEG)(images, prompts))
        assert client.health()["reward"] == JPEG and len(client.health()["version"]) == 24  # the reward's hash
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        restarted = {}
        threading.Timer(0.5, lambda: restarted.setdefault("proc", _start_cli_server(port))).start()
        scores = client(images, prompts)  # refused until the new server listens: retried with backoff
        assert torch.equal(scores, build_reward(JPEG)(images, prompts)) and client.counts["retries"] >= 1
    finally:
        for proc in (server, restarted.get("proc")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


# ----------------------------------------------------------------------------- runs
def _log(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k.replace("jpeg_served", JPEG): v for k, v in record.items()} for record in lines]


class _Killable:
    """A reward server on one port that a scorer call can kill (now) and restart (later)."""

    def __init__(self, kill_after: int | None = None, restart_after: float | None = None, fail_that_call: bool = False):
        self.jpeg, self.calls, self.kill_after, self.restart_after = build_reward(JPEG), 0, kill_after, restart_after
        # fail_that_call: the call that kills the server answers with an error (HTTP 500) instead of its scores, so
        # the client must retry it whatever the timing (otherwise, on a slow machine, the server may be back
        # before the next request and nothing is retried)
        self.fail_that_call = fail_that_call
        self.server = RewardServer(self.score, JPEG, port=0).start()
        self.port, self.url = self.server.port, self.server.url

    def score(self, images, prompts):
        self.calls += 1
        if self.calls == self.kill_after:
            threading.Thread(target=self._kill_then_maybe_restart, daemon=True).start()
            if self.fail_that_call:
                raise RuntimeError("the server is going down")
        return self.jpeg(images, prompts)

    def _kill_then_maybe_restart(self):
        self.server.stop()
        if self.restart_after is not None:
            time.sleep(self.restart_after)
            self.restart()

    def restart(self):
        self.server = RewardServer(self.score, JPEG, port=self.port).start()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The tiny policy-gradient run with JPEG compressibility in-process: its log and LoRA."""
    from cdalign import ConstrainedDDPOTrainer

    tmp = tmp_path_factory.mktemp("in-process")
    ConstrainedDDPOTrainer(_pg(tmp)).train()
    return _log(tmp / "run"), load_file(str(tmp / "run" / "pytorch_lora_weights.safetensors")), tmp / "run"


def _same_run(run: Path, in_process) -> None:
    log, lora, reference = in_process
    assert _log(run) == log  # scores, slacks, λ (dual/*), KL, PPO statistics: exactly
    weights = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(weights[k], lora[k]) for k in lora)
    report, ref = (json.loads((r / "report.json").read_text()) for r in (run, reference))
    keys = ("measured", "ci95", "base_measured", "slack", "dual")  # the held-out verdicts, scored by the same reward
    assert [[c[k] for k in keys] for c in report["constraints"]] == [[c[k] for k in keys] for c in ref["constraints"]]


def test_the_served_constraint_gives_the_in_process_run_exactly(tmp_path, in_process):
    from cdalign import ConstrainedDDPOTrainer

    log = in_process[0]
    assert [r[f"dual/{JPEG}_high"] for r in log] != [0.5] * 3  # λ moves: the trajectory compared is not flat
    with RewardServer(build_reward(JPEG), JPEG, port=0) as server:
        trainer = ConstrainedDDPOTrainer(_pg(tmp_path, served=server.url))
        trainer.train()
    # 2 normalisation batches, 3 rounds of 1 micro-batch, 2 evaluation batches (base, aligned)
    assert server.requests == 7 and trainer.rewards["jpeg_served"].counts["retries"] == 0
    _same_run(tmp_path / "run", in_process)


def test_a_server_killed_mid_run_and_restarted_is_retried_and_the_run_is_unchanged(tmp_path, in_process):
    from cdalign import ConstrainedDDPOTrainer

    server = _Killable(kill_after=3, restart_after=0.6, fail_that_call=True)  # dies on the first round's scores, back 0.6 s later
    try:
        trainer = ConstrainedDDPOTrainer(_pg(tmp_path, served=server.url))
        trainer.train()
    finally:
        server.stop()
    assert trainer.rewards["jpeg_served"].counts["retries"] >= 1
    _same_run(tmp_path / "run", in_process)


def _align_main():
    spec = importlib.util.spec_from_file_location("align_recipe", ROOT / "recipes" / "align.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_run_stopped_by_a_dead_server_exits_1_and_resumes_from_its_checkpoint(tmp_path, in_process, capsys):
    from cdalign.alignment.config import save_config

    main = _align_main()
    server = _Killable(kill_after=4)  # normalisation 2, rounds 1 and 2: dead during round 3, for good
    recipe = tmp_path / "recipe.yaml"
    cfg = _pg(tmp_path, served=server.url)
    cfg.remote_rewards["jpeg_served"].retries, cfg.remote_rewards["jpeg_served"].timeout = 1, 2.0
    cfg.reuse_base_evaluation = False  # the base model's evaluation asks the server too, whatever ran before
    save_config(cfg, recipe)
    try:
        assert main(["--config", str(recipe)]) == 1
    finally:
        server.stop()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: training stopped: remote reward 'jpeg_served' at {server.url}: batch 1/1 ")
    assert "failed 2 times" in err and "The run stopped at step 2" in err
    assert f"{str(tmp_path / 'run' / 'checkpoint-2')!r}, is intact: resume from it with --resume_from_checkpoint latest" in err

    with RewardServer(build_reward(JPEG), JPEG, port=0) as moved:  # back, on another port: the URL may change
        served = json.dumps({"jpeg_served": {"url": moved.url, "cache_key": "v1"}})
        assert main(["--config", str(recipe), "--resume_from_checkpoint", "latest", "--remote_rewards", served]) == 0
        assert moved.requests == 3  # round 3 and the evaluation (base, aligned); the statistics came from the checkpoint
    _same_run(tmp_path / "run", in_process)


def test_the_harness_scores_a_remote_reward_like_the_registry_one(tmp_path):
    from cdalign.evaluation import EvaluationSuite, evaluate

    with RewardServer(build_reward(JPEG), JPEG, port=0) as server:
        suite = EvaluationSuite(name="served", model="cdalign/tiny-random-sd", prompts="shapes", num_prompts=2,
                                rewards=[JPEG, "jpeg_served"], remote_rewards={"jpeg_served": {"url": server.url}},
                                num_inference_steps=2, resolution=32, batch_size=2, grid_images=0, constraints=[])
        result = evaluate(suite, None, progress=False)
    rewards = result.checkpoints["base"]["rewards"]
    assert rewards["jpeg_served"]["mean"] == rewards[JPEG]["mean"] and not math.isnan(rewards[JPEG]["mean"])


def test_the_served_recipe_is_the_policy_gradient_recipe_with_its_jpeg_constraint_served():
    from cdalign.alignment.config import config_to_dict, load_config_file
    from cdalign.recipes_data import find_recipe

    served = config_to_dict(load_config_file(find_recipe("tiny/policy_gradient_served")))
    plain = config_to_dict(load_config_file(find_recipe("tiny/policy_gradient")))
    assert served["remote_rewards"]["jpeg_served"]["url"] == "http://127.0.0.1:8765"
    assert [c["reward"] for c in served["constraints"]] == ["jpeg_served", "brightness"]  # served beside in-process
    served["constraints"][0]["reward"] = JPEG
    differ = {k for k in plain if plain[k] != served[k]}
    assert differ == {"remote_rewards", "output_dir", "save_steps"}


def test_a_suite_may_name_its_remote_rewards_among_its_rewards():
    from cdalign.evaluation.suite import EvaluationSuite, check_reward_names

    suite = EvaluationSuite(rewards=["brightness", "jpeg_served"], remote_rewards={"jpeg_served": {"url": "http://h:1"}})
    check_reward_names(suite, "suite.yaml")
    with pytest.raises(ValueError, match=r"suite\.yaml: rewards\[1\]: 'jpeg_serve' is not allowed \(did you mean 'jpeg_served'"):
        check_reward_names(EvaluationSuite(rewards=["brightness", "jpeg_serve"],
                                           remote_rewards={"jpeg_served": {"url": "http://h:1"}}), "suite.yaml")
    with pytest.raises(ValueError, match=r"remote_rewards\.js\.url: 'h:1' is not an http"):
        EvaluationSuite(remote_rewards={"js": {"url": "h:1"}})
