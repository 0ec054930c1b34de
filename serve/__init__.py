"""``sdrt serve``: the OpenAI Images API and AUTOMATIC1111's API over a Pipeline, with a bounded queue,
batching, an API key and Prometheus metrics (FastAPI + uvicorn; ``--ray`` deploys the same app on Ray Serve).
Needs the ``[serve]`` extra: ``pip install 'sdrt[serve]'``.

    from sdrt.serve.app import ServeConfig, create_app
    app = create_app(ServeConfig(model="engines/sd1"))
"""
