"""The Space demo (cdalign.demo, served by demo/app.py): launched on 127.0.0.1 and driven end
to end with gradio_client on the embedded tiny model at 32 px; unsafe input refused with its
sentence; concurrent requests kept apart; the constrained weights equal cdalign.composition's;
a real headless Chromium renders a generation; the Space folder builds."""

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

gr = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client")

from cdalign.composition import ComponentSpec, ComposeConfig, ConstrainedComposer, DualAscentSpec  # noqa: E402
from cdalign.core.problem import Constraint  # noqa: E402
from cdalign.demo import browser  # noqa: E402
from cdalign.demo.catalog import Limits  # noqa: E402
from cdalign.demo.engine import DemoEngine  # noqa: E402
from cdalign.demo.page import build_demo  # noqa: E402
from cdalign.models.pipeline import load_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
SHIPPED_DIR = DEMO / "loras"
# demo/requirements.txt installs cdalign from the wheel demo/build_space.py puts beside it.
WHEEL_LINE = re.compile(r"^\./wheels/(?P<file>[^\s\[]+\.whl)(?P<extras>\[[^\]]*\])?\s*$", re.M)

PROMPT = "a purple circle on a black background"
FAST = dict(seed=0, steps=4, images=2)  # 32 px, 4 DDIM steps, 2 images: about a second per model
SHIPPED = ("bright", "colorful", "muted")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A runs folder: one real run, a link that escapes it, a .bin-only run, a corrupt one."""
    root = tmp_path_factory.mktemp("demo-runs")
    runs = root / "runs"
    shutil.copytree(SHIPPED_DIR / "bright", runs / "my-run")
    shutil.copytree(SHIPPED_DIR / "colorful", root / "outside" / "evil")
    (runs / "escape").symlink_to(root / "outside" / "evil", target_is_directory=True)
    (runs / "binonly").mkdir()
    (runs / "binonly" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04not a pickle you want")
    shutil.copytree(SHIPPED_DIR / "bright", runs / "model-reward")  # a report naming a reward with model weights
    report = json.loads((runs / "model-reward" / "report.json").read_text())
    report["constraints"][0].update(name="aesthetic_high", source="aesthetic")
    report["normalization"]["aesthetic"] = {"mean": 5.0, "std": 0.5, "count": 64}
    (runs / "model-reward" / "report.json").write_text(json.dumps(report))
    (runs / "corrupt").mkdir()
    (runs / "corrupt" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    return runs


@pytest.fixture(scope="module")
def served(runs_dir):
    engine = DemoEngine(resolution=32, runs_dir=runs_dir, shipped_dir=SHIPPED_DIR, display_root=ROOT)  # as demo/app.py
    demo = build_demo(engine)
    port = browser.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield engine, demo, client
    demo.close()


def _pixels(gallery) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def compare(client, lora, prompt=PROMPT, seed=0, steps=4, images=2):
    return client.predict(lora, prompt, seed, steps, images, api_name="/compare")


def compose(client, loras, include_base=True, mode="constrained", prompt=PROMPT, seed=0, steps=4, images=2,
            kl_estimator="path", dual_steps=2, dual_lr=0.3, distill=False, distill_steps=2, sliders=(0.5,) * 5):
    return client.predict(loras, include_base, mode, prompt, seed, steps, images, kl_estimator, dual_steps, dual_lr,
                          distill, distill_steps, *sliders, api_name="/compose")


def test_app_serves_on_loopback_with_the_two_actions_and_a_bounded_queue(served):
    engine, demo, client = served
    assert demo.local_url.startswith("http://127.0.0.1:")
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/compare", "/compose"}  # the helpers (sliders, page load) are not an API
    assert demo._queue.max_size == Limits().queue_size
    assert engine.catalog.choices() == [f"demo: {n}" for n in SHIPPED] + [
        "run: corrupt", "run: model-reward", "run: my-run"]  # the escaping link and the .bin-only folder are not offered


def test_aligned_vs_base_gives_images_and_the_verdicts_of_its_constraints(served):
    _, _, client = served
    base, aligned, table, card, snippet, numbers = compare(client, "demo: bright")
    base_px, aligned_px = _pixels(base), _pixels(aligned)
    assert len(base_px) == len(aligned_px) == 2 and base_px[0].shape == (256, 256, 3)
    assert [item["caption"] for item in base] == [item["caption"] for item in aligned]  # same seeds
    assert not np.array_equal(base_px[0], aligned_px[0])  # the LoRA changes the image
    row = numbers["constraints"][0]
    assert (row["reward"], row["direction"], row["threshold"]) == ("brightness", "high", 0.5)
    for model in ("base", "aligned"):  # the harness's verdict on the per-image values shown
        values = row[model].pop("values")
        assert len(values) == 2
        constraint = Constraint(row["constraint"], "brightness", "high", 0.5, True)
        assert row[model] == constraint.verdict(torch.tensor(values, dtype=torch.float64))
    assert numbers["kl_to_base"]["n"] == 2 and numbers["kl_to_base"]["mean"] > 0
    assert "brightness" in table and "| brightness\\_high |" in card and "price λ" in card
    assert "pipe.load_lora_weights('demo/loras/bright'" in snippet


def test_a_reward_that_needs_model_weights_is_not_scored_live(served):
    """A report naming e.g. 'aesthetic' must not make the Space download a CLIP model: the
    page says so, and the card table still shows the run's own numbers."""
    _, _, client = served
    base, aligned, table, card, snippet, numbers = compare(client, "run: model-reward")
    assert numbers["constraints"] == [] and len(_pixels(aligned)) == 2
    assert any("'aesthetic' needs model weights, so it is not scored live" in n for n in numbers["notes"])
    assert "aesthetic" in card


def test_the_same_seed_gives_the_same_images_and_another_seed_others(served):
    _, _, client = served
    first = _pixels(compare(client, "demo: muted")[1])
    again = _pixels(compare(client, "demo: muted")[1])
    other = _pixels(compare(client, "demo: muted", seed=1)[1])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_constrained_weights_are_what_cdalign_composition_computes(served, tmp_path):
    _, _, client = served
    *_, numbers = compose(client, ["demo: bright", "demo: muted"], mode="constrained", seed=3, dual_steps=2, dual_lr=0.3)
    cfg = ComposeConfig(
        pretrained_model_name_or_path="cdalign/tiny-shapes-sd",
        components=[ComponentSpec(name="bright", kind="lora", source=str(SHIPPED_DIR / "bright")),
                    ComponentSpec(name="muted", kind="lora", source=str(SHIPPED_DIR / "muted")),
                    ComponentSpec(name="base", kind="base")],
        num_inference_steps=4, eta=1.0, guidance_scale=3.0, resolution=32, kl_estimator="path",
        dual=DualAscentSpec(steps=2, lr=0.3, schedule="constant", normalize=True, batch_size=2),
        eval_batches=1, eval_seed=3, output_dir=str(tmp_path), overwrite_output_dir=True, seed=3,
    )
    composer = ConstrainedComposer(cfg, pipeline=load_pipeline("cdalign/tiny-shapes-sd"), prompts=[PROMPT],
                                   eval_prompts=[PROMPT])
    learned = composer.fit(progress=False)
    assert numbers["weights"] == pytest.approx(learned.tolist(), abs=1e-9)
    assert numbers["weights"] != pytest.approx([1 / 3] * 3, abs=1e-3)  # the dual steps moved them
    entry = composer.evaluate_weights(learned, "constrained")
    for name in composer.names:  # and the KLs shown are the composer's on the same items
        assert numbers["kl"]["constrained"]["per_component"][name]["mean"] == pytest.approx(entry["kl"][name]["mean"],
                                                                                            rel=1e-9)


@pytest.mark.slow
def test_equal_and_manual_weights_and_the_distilled_lora(served):
    _, _, client = served
    chosen, equal, distilled, table, plot, snippet, lora, numbers = compose(client, ["demo: bright", "demo: colorful"],
                                                                           mode="equal")
    assert numbers["weights"] == pytest.approx([1 / 3] * 3) and not equal and not distilled and lora is None
    assert len(_pixels(chosen)) == 2 and Path(plot).stat().st_size > 0
    chosen, equal, distilled, table, plot, snippet, lora, numbers = compose(
        client, ["demo: bright", "demo: colorful"], mode="manual", sliders=(0.6, 0.3, 0.3, 0.9, 0.9), distill=True)
    assert numbers["weights"] == pytest.approx([0.5, 0.25, 0.25])
    assert numbers["components"] == ["demo: bright", "demo: colorful", "base model"]
    assert len(_pixels(equal)) == len(_pixels(distilled)) == 2
    assert "set_adapters(['bright', 'colorful'], adapter_weights=[0.5, 0.25])" in snippet
    pipe = load_pipeline("cdalign/tiny-shapes-sd")  # the distilled LoRA is a diffusers LoRA
    pipe.load_lora_weights(str(Path(lora).parent), adapter_name="distilled")
    assert "distilled" in pipe.unet.peft_config
    assert numbers["distilled"]["steps"] == 2 and set(numbers["distilled"]["kl"]) == {"bright", "colorful", "base"}


UNSAFE = [
    # (endpoint, overrides, what the page says)
    ("compare", {"lora": "run: ../../../etc"}, "points outside the demo's LoRA folders"),
    ("compare", {"lora": "run: escape"}, "points outside the demo's LoRA folders"),  # a link out of the runs folder
    ("compare", {"lora": "demo: ../../demo"}, "points outside the demo's LoRA folders"),
    ("compare", {"lora": "run: /etc"}, "only names from the list are accepted, not paths"),
    ("compare", {"lora": "run: binonly"}, "no LoRA there (pytorch_lora_weights.safetensors)"),  # never a .bin/pickle
    ("compare", {"lora": "run: corrupt"}, "is corrupt or truncated"),
    ("compare", {"lora": "/etc/passwd"}, "not a Hub repo id"),
    ("compare", {"lora": "owner/bad name"}, "is not a valid Hub repo id"),
    ("compare", {"lora": "owner/name@../../x"}, "is not a valid revision"),
    ("compare", {"lora": "hub: cdalign/no-such-lora@main"}, "could not be fetched from the Hub"),
    ("compare", {"prompt": "a red circle " * 20}, "at most 200 are accepted"),
    ("compare", {"prompt": "  "}, "prompt: empty"),
    ("compare", {"steps": 26}, "Value 26 is greater than maximum value 25"),  # the slider's own bound, first
    ("compare", {"images": 5}, "Value 5 is greater than maximum value 4"),
    ("compare", {"seed": -1}, "Value -1 is less than minimum value 0"),
    ("compose", {"loras": ["demo: bright", "demo: colorful", "demo: muted", "run: my-run", "hub: a/b"]},
     "at most 4 can be composed"),
    ("compose", {"loras": ["demo: bright"], "include_base": False}, "pick at least 2 LoRAs"),
    ("compose", {"loras": ["demo: bright", "demo: bright"]}, "the same LoRA is picked twice"),
    ("compose", {"loras": ["demo: bright", "run: ../x"]}, "points outside the demo's LoRA folders"),
    ("compose", {"loras": ["demo: bright", "demo: muted"], "dual_steps": 9}, "Value 9 is greater than maximum value 8"),
    ("compose", {"loras": ["demo: bright", "demo: muted"], "mode": "manual", "sliders": (0, 0, 0, 0, 0)}, "all are 0"),
]


@pytest.mark.parametrize("endpoint, overrides, message", UNSAFE, ids=[f"{e}-{m[:24]}" for e, _, m in UNSAFE])
def test_unsafe_input_is_refused_with_a_sentence(served, endpoint, overrides, message):
    _, _, client = served
    args = {"lora": "demo: bright"} if endpoint == "compare" else {"loras": ["demo: bright", "demo: muted"]}
    args.update(overrides)
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        (compare if endpoint == "compare" else compose)(client, **args)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 26, "steps: 26 is out of range; give a whole number from 1 to 25"),
    ("images", 0, "images: 0 is out of range; give a whole number from 1 to 4"),
    ("images", 2.5, "images: 2.5 is out of range; give a whole number from 1 to 4"),
    ("seed", "x", "seed: 'x' is not a number; give a whole number from 0 to 2147483647"),
])
def test_the_engine_bounds_each_request_itself(served, field, value, message):
    """Behind the page's sliders, the engine refuses out-of-bounds work too (other callers)."""
    engine, _, _ = served
    args = dict(FAST, **{field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        engine.compare("demo: bright", PROMPT, args["seed"], args["steps"], args["images"])
    with pytest.raises(ValueError, match="dual steps: 9 is out of range; give a whole number from 1 to 8"):
        engine.compose(["demo: bright", "demo: muted"], True, "constrained", PROMPT, 0, 4, 2, dual_steps=9)


def test_an_unexpected_failure_reaches_the_page_as_a_sentence(served, monkeypatch):
    engine, _, client = served

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail that stays in the server log")

    monkeypatch.setattr(engine, "compare", broken)
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        compare(client, "demo: bright")
    assert "failed unexpectedly (RuntimeError); try again" in str(err.value)
    assert "internal detail" not in str(err.value)


def test_concurrent_requests_keep_their_own_adapters(served):
    """Two requests at once (the queue runs two) with different LoRAs give what each gives
    alone: the pipeline is used under a lock, with only the request's own adapter loaded."""
    engine, _, client = served
    alone = {lora: _pixels(compare(client, lora, images=3)[1]) for lora in ("demo: bright", "demo: colorful")}
    jobs = {lora: client.submit(lora, PROMPT, 0, 4, 3, api_name="/compare") for lora in alone}
    together = {lora: _pixels(job.result(timeout=120)[1]) for lora, job in jobs.items()}
    for lora in alone:
        assert all(np.array_equal(a, b) for a, b in zip(alone[lora], together[lora])), lora
    assert not np.array_equal(alone["demo: bright"][0], alone["demo: colorful"][0])
    assert not getattr(engine.pipe.unet, "peft_config", None)  # nothing left on the shared pipeline


def test_the_engine_lock_serialises_pipeline_use(served):
    engine, _, _ = served
    inside, overlaps = [], []

    def hold():
        with engine._pipeline(lambda *_: None):
            inside.append(1)
            overlaps.append(len(inside))
            threading.Event().wait(0.2)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]


def test_shipped_loras_load_with_diffusers_and_carry_their_constraints():
    pipe = load_pipeline("cdalign/tiny-shapes-sd")
    for name in SHIPPED:
        folder = SHIPPED_DIR / name
        pipe.load_lora_weights(str(folder), adapter_name=name)
        report = json.loads((folder / "report.json").read_text())
        assert report["model"] == "cdalign/tiny-shapes-sd" and len(report["constraints"]) == 1
        assert "## Constraints" in (folder / "README.md").read_text()
        assert sum(f.stat().st_size for f in folder.iterdir()) < 500_000
    assert set(pipe.unet.peft_config) == set(SHIPPED)


def test_space_front_matter_pins_the_gradio_the_extra_installs():
    import tomllib
    import yaml

    front = yaml.safe_load((DEMO / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    assert f"gradio=={front['sdk_version']}" in extra
    requirements = (DEMO / "requirements.txt").read_text()
    assert "torch==" in requirements and WHEEL_LINE.search(requirements).group("file").startswith("cdalign-")


@pytest.mark.slow
def test_a_headless_browser_renders_a_generation(served, tmp_path):
    binary = browser.find_chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (Debian package `chromium`; .ci/run installs it where it can)")
    _, demo, _ = served
    shot = browser.capture(demo.local_url + "?example=3", binary=binary, timeout=180)
    (tmp_path / "page.png").write_bytes(shot.png)
    assert shot.rendered["errors"] == 0
    assert shot.rendered["base-gallery"] == shot.rendered["aligned-gallery"] == 4
    assert 'id="aligned-gallery"' in shot.dom and "<img" in shot.dom
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "page.png").convert("L"), dtype=np.float64)
    assert pixels.shape == (1000, 1280) and pixels.std() > 20  # not a blank page


@pytest.mark.slow
def test_the_space_folder_installs_cdalign_from_the_wheel_it_ships(tmp_path):
    import zipfile

    def build(out):
        return subprocess.run([sys.executable, str(DEMO / "build_space.py"), "--out", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    done = build(tmp_path / "space")
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (tmp_path / "space").iterdir()} >= {"app.py", "README.md", "requirements.txt", "loras", "wheels"}
    [wheel] = (tmp_path / "space" / "wheels").glob("cdalign-*.whl")
    requirements = (tmp_path / "space" / "requirements.txt").read_text()
    assert f"./wheels/{wheel.name}[demo]" in requirements.splitlines()
    names = zipfile.ZipFile(wheel).namelist()
    assert "cdalign/models/pipeline.py" in names and "cdalign/data/tiny-shapes-sd/model_index.json" in names
    assert "cdalign/demo/engine.py" in names and "cdalign/demo/page.py" in names  # what app.py imports
    refused = build(ROOT)
    assert refused.returncode == 2 and "would replace the checkout" in refused.stderr


@pytest.mark.parametrize("name", SHIPPED)
def test_the_recipes_that_made_the_shipped_loras_still_parse(name):
    """demo/recipes/NAME.yaml reruns with recipes/align.py (its config parser accepts it) and
    asks for what the shipped LoRA's config.yaml recorded."""
    from cdalign.alignment.config import parse_config

    config = parse_config(["--config", str(DEMO / "recipes" / f"{name}.yaml")])
    recorded = yaml.safe_load((SHIPPED_DIR / name / "config.yaml").read_text())
    assert config.pretrained_model_name_or_path == recorded["pretrained_model_name_or_path"] == "cdalign/tiny-shapes-sd"
    spec = config.constraints[0]
    assert (spec.reward, spec.direction, spec.threshold) == tuple(recorded["constraints"][0][k]
                                                                  for k in ("reward", "direction", "threshold"))
    assert (config.max_steps, config.seed, config.learning_rate) == (recorded["max_steps"], recorded["seed"],
                                                                     recorded["learning_rate"])


@pytest.mark.slow
def test_a_hub_lora_at_a_revision_gives_what_the_same_files_give_locally(served, tmp_path, monkeypatch):
    """owner/name@revision through the Hub client (a loopback Hub, tests/hub_server.py): the
    page shows the same images, verdicts and card as the shipped folder the repo holds."""
    from huggingface_hub import HfApi, constants

    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer

    engine, _, client = served
    with HubServer() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at call time; the test session is offline
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
        monkeypatch.setenv("HF_TOKEN", "hf_loopback")
        api = HfApi(endpoint=hub.url, token="hf_loopback")
        api.create_repo("lab/bright-lora")
        commit = api.upload_folder(repo_id="lab/bright-lora", folder_path=str(SHIPPED_DIR / "bright")).oid
        local = compare(client, "demo: bright")
        for choice in ("hub: lab/bright-lora@main", f"lab/bright-lora@{commit}"):
            got = compare(client, choice)
            assert [np.array_equal(a, b) for a, b in zip(_pixels(got[1]), _pixels(local[1]))] == [True, True]
            assert got[5]["constraints"] == local[5]["constraints"] and got[3] == local[3]  # verdicts, card table
            assert "pipe.load_lora_weights('lab/bright-lora'" in got[4]
        with pytest.raises(gradio_client.exceptions.AppError, match="could not be fetched from the Hub"):
            compare(client, "hub: lab/bright-lora@no-such-branch")
        monkeypatch.setattr(engine.catalog, "max_lora_bytes", 1000)  # a Hub file above the cap is not downloaded
        too_big = "weights are 206,792 bytes; this demo loads LoRAs of at most 1,000"
        with pytest.raises(gradio_client.exceptions.AppError, match=too_big):
            compare(client, "hub: lab/bright-lora@main")
