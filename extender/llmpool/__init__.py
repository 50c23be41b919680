"""LLMPool: workload-aware routing of LLM requests across vLLM replicas.

Sub-packages:

* :mod:`llmpool.routing` -- the routing brain (request/endpoint data model, policies,
  registry). Pure Python, no I/O; the simulator and the live endpoint picker use the
  same objects.
* :mod:`llmpool.lab` -- the discrete-event simulator of a pool of vLLM engines,
  workloads, metrics and the ``llmpool bench`` command.
"""

__version__ = "0.1.0"
