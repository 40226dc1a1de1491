"""labkit: the InstructGPT recipe (SFT -> K-way reward model -> PPO) on small language models.

Importing labkit has no side effects; each stage lives in its own module
(``labkit.models``, ``labkit.data``, ``labkit.labelers``, ``labkit.feedback``,
``labkit.widgets``, ``labkit.sft``, ``labkit.reward``, ``labkit.ppo``,
``labkit.evaluate``, ``labkit.live``, ``labkit.cli``).
"""

__version__ = "0.1.0"
