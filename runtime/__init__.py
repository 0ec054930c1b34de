"""Numpy side: model directory, tokenizer, schedulers, backends, pipelines. Never imports torch."""
