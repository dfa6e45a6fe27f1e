"""Trainer code the method modules run: transformers/TRL plumbing shared by every Trainer-based
method (hf.py), and llmtune's own PPO trainer on Accelerate (ppo.py, its maths in ppo_core.py)."""
