"""Checkpoint IO with Hugging Face: read config + safetensors, write them back."""
