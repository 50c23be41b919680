"""The live endpoint picker: an Envoy ext_proc server that routes LLM requests to model servers."""

#: The picker's gRPC transports (``llmpool.picker.transport``); named here so the CLI can offer
#: them without importing gRPC.
TRANSPORTS = ("h2", "grpclib", "grpcio")
DEFAULT_TRANSPORT = "h2"
