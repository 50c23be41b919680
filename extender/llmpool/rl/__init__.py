"""The heuristic-guided reinforcement-learning router (paper a's WG-RL).

* :mod:`llmpool.rl.features` -- the state encoding (one row per action);
* :mod:`llmpool.rl.policy` -- the ``rl`` policy (onnxruntime; lab and picker alike);
* :mod:`llmpool.rl.model` -- the model files (ONNX + metadata);
* :mod:`llmpool.rl.reward` -- the three reward variants and HuRL's schedule;
* :mod:`llmpool.rl.dqn`, :mod:`llmpool.rl.train` -- Double DQN training (torch: the ``train`` extra).
"""
