"""The LLMPool Kopf operator (built in a later milestone; see the project issues).

This package lives in ``operator/`` as ``llmpool_operator`` so that the folder
``operator/`` itself is never importable and cannot shadow the standard library's
``operator`` module.
"""
