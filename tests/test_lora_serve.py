"""One vLLM endpoint serving its base and LoRA adapters, over real HTTP with the official openai client: the
request's ``model`` picks the adapter and gets the HF PEFT reference's answer, an adapter copied into the
``lora_dir`` (an s3:// prefix on the moto server) after the endpoint started is listed and served without a
redeploy, an unknown name is a 404, and every adapter this endpoint cannot serve (another base, a rank above the
cap, a corrupt file, visual modules of its own) is a 400 naming why, with the replica healthy after."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import uuid

import pytest
import torch

from tests.test_lora_vllm import make_adapter
from tests.test_vllm_parity import QUESTIONS, picture, request, vllm_tiny

pytestmark = pytest.mark.integration

APP, KEY = "slime-lora", "lora-key"


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(question: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": png_url(image)}}]}]


def upload(local: str, uri: str) -> None:
    import s3fs

    s3fs.S3FileSystem().put(local, uri, recursive=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from slime.presets import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("lora_serve")
    base = str(save_tiny_checkpoint(root / "base", seed=3, cfg=vllm_tiny("llama")))
    other = str(save_tiny_checkpoint(root / "other", seed=4, cfg=vllm_tiny("llama")))
    return {"root": root, "base": base,
            "a1": make_adapter(base, root / "a1", 1, ("q_proj", "v_proj", "o_proj")),
            "a2": make_adapter(base, root / "a2", 2, ("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj")),
            "a3": make_adapter(base, root / "a3", 6, ("v_proj", "down_proj")),
            "other": make_adapter(other, root / "other_base", 5, ("q_proj",))}


@pytest.fixture(scope="module")
def endpoint(ray_session, moto_s3, models):
    import boto3
    from ray import serve

    from pipelines.serve.app import build_app
    from tests.conftest import shared_serve

    bucket = f"adapters-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    port = shared_serve()
    # cpu_threads=2: the engine computes on both cores though Ray gives a 0.25-CPU replica one OMP thread (tested below)
    args = dict(model=models["base"], model_id="base", api_key=KEY, engine="vllm", num_cpus=0.25, cpu_threads=2, max_tokens=32,
                adapters={"a1": models["a1"]}, lora_dir=f"s3://{bucket}/lora", max_loras=2, max_cpu_loras=2, max_lora_rank=8,
                env={"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    # serve.run returns once the replica is up (engine warmed, registered adapters loaded)
    yield {"url": f"http://127.0.0.1:{port}", "lora_dir": f"s3://{bucket}/lora"}
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(endpoint):
    import openai

    return openai.OpenAI(base_url=f"{endpoint['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def references(models):
    """The HF Predictor (PEFT, unmerged) for the base and each adapter: the answers the endpoint must give."""
    from slime.predictor import Predictor

    return {name: Predictor.load(models[name]) for name in ("base", "a1", "a2", "a3")}


def expected(pred, question: str, image) -> str:
    req = request(question, image, None)
    req.max_tokens = 12
    return pred.generate([req])[0].text


def test_models_field_picks_the_adapter_and_a_runtime_upload_is_served(client, endpoint, models, references):
    listed = [m.id for m in client.models.list().data]
    assert listed[0] == "base" and "a1" in listed and "a2" not in listed, listed
    upload(models["a2"], f"{endpoint['lora_dir']}/a2")  # after the endpoint started: no redeploy
    listed = [m.id for m in client.models.list().data]
    assert "a2" in listed, listed

    jobs = [(name, q, picture(150, 90, seed=i)) for i, q in enumerate(QUESTIONS) for name in ("base", "a1", "a2")]
    got: dict[int, tuple[str, str]] = {}

    def ask(i: int, name: str, q: str, img) -> None:
        r = client.chat.completions.create(model=name, messages=messages(q, img), max_tokens=12, temperature=0)
        got[i] = (r.model, r.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]  # one batch, mixed
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong = [(name, q, got.get(i), expected(references[name], q, img))
             for i, (name, q, img) in enumerate(jobs) if got.get(i) != (name, expected(references[name], q, img))]
    assert not wrong, wrong
    answers = {name: [got[i][1] for i, (n, _, _) in enumerate(jobs) if n == name] for name in ("base", "a1", "a2")}
    assert answers["a1"] != answers["base"] and answers["a2"] != answers["base"]  # the adapters do something

    # A third adapter with 2 kept loaded per replica: vLLM evicts the least recently used (a1) and reloads it
    # from its path when asked again; both still answer as their references.
    upload(models["a3"], f"{endpoint['lora_dir']}/a3")
    q, img = QUESTIONS[0], picture(150, 90, seed=0)
    for name in ("a3", "a1"):
        r = client.chat.completions.create(model=name, messages=messages(q, img), max_tokens=12, temperature=0)
        assert (r.model, r.choices[0].message.content) == (name, expected(references[name], q, img))


def test_an_unknown_adapter_is_a_404_with_an_openai_body(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_unservable_adapters_are_400s_naming_why_and_the_replica_stays_up(client, endpoint, models):
    import httpx
    import openai
    from safetensors.torch import load_file, save_file

    from slime.lora import LoraSpec, add_lora, fingerprint, save_adapter

    root = models["root"]
    # rank 16 > the endpoint's max_lora_rank 8
    from slime.checkpoint import load_pretrained
    from slime.model import set_trainable

    model, _ = load_pretrained(models["base"])
    set_trainable(model, ["projector"])
    names = add_lora(model, LoraSpec(r=16, alpha=16, dropout=0.0, targets=("q_proj",)))
    serving = {"visual_mode": model.cfg.visual_mode, "gamma": model.cfg.local.gamma}
    save_adapter(model, root / "rank16", base_uri=models["base"], base_fingerprint=fingerprint(models["base"]),
                 serving=serving, trainable=names)
    # its own projector (a LoRA phase that also trained the projector): vLLM would serve the base's instead
    model, _ = load_pretrained(models["base"])
    set_trainable(model, ["projector"])
    names = add_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0, targets=("q_proj",)))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("projector.")).add_(0.01)
    save_adapter(model, root / "visual", base_uri=models["base"], base_fingerprint=fingerprint(models["base"]),
                 serving=serving, trainable=names + [n for n, _ in model.named_parameters()
                                                     if n.startswith("projector.")])
    # a corrupt weights file: the header says more bytes than the file holds
    shutil.copytree(models["a1"], root / "corrupt")
    blob = (root / "corrupt" / "adapter_model.safetensors").read_bytes()
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    # LoRA tensors that fit no projection of this base (a wider model's adapter under this base's fingerprint)
    shutil.copytree(models["a1"], root / "misfit")
    tensors = load_file(str(root / "misfit" / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in tensors.items()},
              str(root / "misfit" / "adapter_model.safetensors"))
    cases = {"other": (models["other"], "belongs to base"), "rank16": (root / "rank16", "above this endpoint's"),
             "visual": (root / "visual", "slime merge"), "corrupt": (root / "corrupt", "unreadable"),
             "misfit": (root / "misfit", "fits no projection")}
    for name, (path, _) in cases.items():
        upload(str(path), f"{endpoint['lora_dir']}/{name}")
    for name, (_, why) in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        body = e.value.body
        assert body["code"] == "adapter_load_failed" and body["param"] == "model" and why in body["message"], body
        print(f"{name}: 400 {body['message']}")
    assert httpx.get(f"{endpoint['url']}/healthz").status_code == 200
    ok = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.model == "a1" and ok.choices[0].finish_reason in ("stop", "length")


def test_the_engine_computes_on_cpu_threads_not_on_rays_one(client):
    """``cpu_threads=2`` on this 0.25-CPU replica (Ray gives it ``OMP_NUM_THREADS=1``): its vLLM engine core (a
    process the replica spawns) computes on 2 threads; with Ray's default its second thread does no work."""
    import psutil
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    replicas = [a.pid for a in alive if a.class_name.startswith(f"ServeReplica:{APP}:")]
    # The engine core is a process the replica spawns (vLLM titles it "VLLM::EngineCore"; psutil's name() is the
    # kernel's 15-character copy). Fresh-clone full suites have three times found no process titled so with the
    # replica among its ancestors, while the replica answered: so the replica's own descendants are taken whatever
    # their title (the engine core and multiprocessing's idle resource tracker; the busiest threads are the core's),
    # and a failure prints what was there.
    def titled_core(p) -> bool:
        try:
            return p.name().startswith("VLLM::EngineCor") or "EngineCore" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    cores = []
    for pid in replicas:
        try:
            cores += psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            pass
    if not cores:
        seen = []
        for p in psutil.process_iter():
            if titled_core(p):
                try:
                    seen.append((p.pid, p.name(), [(a.pid, a.name()) for a in p.parents()]))
                except psutil.Error as e:
                    seen.append((p.pid, repr(e)))
        raise AssertionError(f"no process under the replicas {replicas}; engine cores on the machine: {seen}")

    def cpu_s() -> dict:
        return {(c.pid, t.id): t.user_time + t.system_time for c in cores for t in c.threads()}

    before = cpu_s()
    for i in range(6):
        reply = client.chat.completions.create(model="base", messages=messages(f"colour {i}?", picture(96, 72, seed=i)),
                                               max_tokens=16)
        assert reply.usage.completion_tokens >= 1
    used = sorted((v - before.get(k, 0.0) for k, v in cpu_s().items()), reverse=True)
    # OpenMP splits each matmul across its threads: the second-busiest thread does a real share of the work
    assert used[0] > 0 and used[1] > 0.2 * used[0], f"per-thread CPU seconds {used[:4]}"
