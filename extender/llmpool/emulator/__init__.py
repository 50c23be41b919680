"""A vLLM-compatible emulator: vLLM's OpenAI API and V1 ``/metrics`` on the outside,
the lab's engine model (the same code the simulator runs) on the inside, driven by a
wall clock."""
