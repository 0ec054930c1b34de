"""The built-in default model (issue 6): synthetic scenes with captions (``data``), an evaluator that
reads generated images back into colour / shape / size / position (``evaluate``).

Both modules need only numpy and Pillow, so the evaluator can run in the torch-free runtime's tests.
"""
