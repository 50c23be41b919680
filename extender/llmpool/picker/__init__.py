"""The live endpoint picker: an Envoy ext_proc server that routes LLM requests to model servers."""
