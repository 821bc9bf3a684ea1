"""Serve stage: the OpenAI-compatible Ray Serve app and the vLLM engine it (and evaluation) runs on.

    app           build_app(ServeArgs | dict) -> Application; the HF Predictor ingress (reference path)
    ingress       what both ingresses share: ServeArgs, per-engine settings, model id, auth, error bodies
    openai        the OpenAI chat-completions wire format: schema, validation, images, errors, SSE (no Ray)
    vllm_app      the ingress over an in-replica vLLM AsyncLLM (engine="vllm")
    engine        one construction path for vLLM engines: serving, batch inference, evaluation
    vllm_model    SliME as an out-of-tree vLLM multimodal model (wraps slime/ modules)
    vllm_plugin   the vllm.general_plugins entry point that registers it (light: names, no model import)
    follow        ``slime serve --follow``: roll the app when an MLflow registry alias moves (AliasFollower)

May import: ``pipelines.storage``, ``pipelines.tracking``, ``slime``, ray.serve, fastapi, vllm. Never ``pipelines.train`` (the
training loop), ``pipelines.data``, ``pipelines.lifecycle``, ``evaluate`` or ``demo``: a replica needs
only a checkpoint path.

``pipelines.serve:build_app`` is the app's public import path (cluster/serve_config.yaml,
cluster/rayservice.yaml, the scheduler's rollout of live apps deployed with it). It is resolved lazily so
that importing this package, or ``pipelines.serve.engine`` from evaluation, stays as light as before:
ray.serve and fastapi load only when ``build_app`` (``pipelines.serve.app``) is asked for.
"""


def __getattr__(name: str):
    if name == "build_app":
        from pipelines.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
